"""Faults on purpose, as a user meets them, in one process: corrupt, truncated or deleted outputs, garbage records,
unwritable paths and nonsense values, and what results.json records. Each test fails if the fault goes undetected: a
recomputed run must give the clean run's numbers, and a refused one must say why in one line. Faults that need a
second process (races, locks, kill, Ctrl-C) are in test_workdir_processes.py."""

import json
import os
import pathlib

import pytest
from conftest import FAST_RUN, SMALL_RUN, copy_workdir, rerun, results_rows

from jaxforget import cli
from jaxforget.workdir import Workdir

pytestmark = pytest.mark.usefixtures("cli_numerics")


def _only(pattern: str, work: pathlib.Path) -> pathlib.Path:
    (path,) = (work / "seed-0").glob(pattern)
    return path


def _flip_bit(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


FAULTS = {
    "one bit of the masks": lambda w: _flip_bit(_only("masks.*.npz", w)),
    "one bit of the poisoned checkpoint": lambda w: _flip_bit(_largest_file(_only("poisoned.*[!n]", w))),
    "truncated curvature": lambda w: _only("curvature.*.npz", w).write_bytes(
        _only("curvature.*.npz", w).read_bytes()[:100]
    ),
    "deleted unlearned model": lambda w: next((w / "seed-0" / "unlearned").glob("random--first-order.*.npz")).unlink(),
    "garbage select record": lambda w: _only("select.*.json", w).write_text("{not json"),
    "record of other settings": lambda w: _only("evaluate.*.json", w).write_text('{"key": "other", "rows": []}'),
}
NAMED = {  # the file each fault's notice must name
    "one bit of the masks": "masks.",
    "one bit of the poisoned checkpoint": "poisoned.",
    "truncated curvature": "curvature.",
    "deleted unlearned model": "random--first-order.",
    "garbage select record": "select.",
    "record of other settings": "evaluate.",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_output_is_named_and_recomputed_to_the_clean_numbers(fault, clean_run, tmp_path, capsys):
    work = copy_workdir(clean_run, tmp_path)
    FAULTS[fault](work)
    capsys.readouterr()
    assert rerun(work, tmp_path / "out") == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxforget:")]
    assert notices and NAMED[fault] in notices[0] and "recomputing" in notices[0]
    assert "Traceback" not in "\n".join(notices)
    assert results_rows(tmp_path / "out") == results_rows(clean_run / "out")
    # The repaired workdir is whole again: a second rerun finds nothing to recompute.
    assert rerun(work, tmp_path / "out2") == 0
    assert "recomputing" not in capsys.readouterr().err


def test_a_rule_whose_estimate_the_workdir_lacks_gets_it_computed(clean_run, tmp_path):
    """FAST_RUN's rules need only the Hessian diagonal; a rule ranking by the Fisher on the same workdir must not
    reuse that curvature record (it once did, and the select stage failed with a KeyError)."""
    work = copy_workdir(clean_run, tmp_path)
    assert rerun(work, tmp_path / "out", "--selections", "fisher-largest,hessian-largest") == 0
    rows = {row["method"]: row for row in results_rows(tmp_path / "out")}
    assert rows["fisher-largest/first-order"]["top_k_recall"] is not None
    clean = {row["method"]: row for row in results_rows(clean_run / "out")}
    assert rows["hessian-largest/first-order"] == clean["hessian-largest/first-order"]


def test_a_corrupt_checkpoint_is_refused_by_a_stage_that_only_reads_it(clean_run, tmp_path, capsys):
    work = copy_workdir(clean_run, tmp_path)
    _flip_bit(_largest_file(_only("retrained.*[!n]", work)))
    assert cli.main(["evaluate", *FAST_RUN, "--workdir", str(work), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert "retrained." in error[0] and error[-1].startswith("jaxforget: error: stage 'train'")
    assert not (tmp_path / "out").exists()


def _refused(args: list[str], capsys) -> str:
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxforget: error: ")
    return lines[0]


def test_unusable_paths_are_refused_before_any_compute(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    work = tmp_path / "work"
    for option, value in (("--out", blocker), ("--out", blocker / "below"), ("--workdir", blocker)):
        paths = {"--workdir": str(work), "--out": str(tmp_path / "out"), option: str(value)}
        message = _refused(["run", *SMALL_RUN, *(x for pair in paths.items() for x in pair)], capsys)
        assert option in message and str(blocker) in message and "file" in message
    assert not work.exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_an_unwritable_workdir_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    message = _refused(["run", *SMALL_RUN, "--workdir", str(locked / "work")], capsys)
    assert "--workdir" in message and "cannot create files" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--budget", "1e-9"], "--budget: 1e-09 selects none of the"),
        (["--tau", "inf"], "--tau: inf must be a positive, finite number"),
        (["--batch-size", "5000"], "--batch-size: 5000 is larger than"),
        (["--group-size", "5000"], "--group-size: 5000"),
        (["--seeds", "0,-1"], "--seeds: '0,-1' must list distinct non-negative integers"),
        (["--check-reproduction", "nowhere"], "--check-reproduction: cannot read nowhere"),
    ],
)
def test_nonsense_values_are_refused_naming_the_option_and_nothing_is_created(args, expected, tmp_path, capsys):
    work = tmp_path / "work"
    message = _refused(["run", *SMALL_RUN, *args, "--workdir", str(work), "--out", str(tmp_path / "out")], capsys)
    assert expected in message
    assert not work.exists() and not (tmp_path / "out").exists()


def test_the_smallest_valid_values_are_named(tmp_path, capsys):
    message = _refused(["train", *SMALL_RUN, "--budget", "1e-9", "--workdir", str(tmp_path)], capsys)
    total = int(message.split("of the ")[1].split(" parameters")[0].replace(",", ""))
    assert f"1/{total} = {1 / total:.3g}" in message
    assert total > 1000
    message = _refused(["train", *SMALL_RUN, "--batch-size", "5000", "--workdir", str(tmp_path)], capsys)
    largest = int(message.rsplit(" ", 1)[1].rstrip("."))
    assert f"the largest valid value is {largest}" in message and 0 < largest < 5000


def test_evaluate_alone_reports_every_stage_time(clean_run, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["evaluate", *FAST_RUN, "--workdir", str(clean_run / "work"), "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert set(record["stage_seconds"][0]) == {"train", "curvature", "select", "unlearn", "evaluate"}
    assert record["curvature"][0]["samples"] > 0
    assert results_rows(out) == results_rows(clean_run / "out")


def test_results_record_the_machine_and_versions(clean_run):
    record = json.loads((clean_run / "out" / "results.json").read_text())
    assert record["versions"]["jax"] and record["versions"]["jaxlib"] and record["versions"]["flax"]
    assert record["machine"]["cpu"]["model"] and record["machine"]["backend"] == "cpu"
    assert record["machine"]["devices"][0].startswith("cpu:0")


def test_check_reproduction_passes_the_same_run_and_flags_a_changed_number(clean_run, tmp_path, capsys):
    args = ["evaluate", *FAST_RUN, "--workdir", str(clean_run / "work"), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main([*args, "--check-reproduction", str(clean_run / "out")]) == 0
    assert "0 beyond it" in capsys.readouterr().out
    tampered = json.loads((clean_run / "out" / "results.json").read_text())
    tampered["per_seed"][0][2]["test_accuracy"] += 0.1
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    assert cli.main([*args, "--check-reproduction", str(tmp_path / "tampered.json")]) == 1
    report = capsys.readouterr().out
    assert "1 beyond it" in report and f"{tampered['per_seed'][0][2]['method']} test_accuracy" in report
    tampered["config"]["budget"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(tampered))
    message = _refused([*args, "--check-reproduction", str(tmp_path / "other.json")], capsys)
    assert "--budget 0.5" in message and "other settings" in message


def test_stage_commands_show_only_their_options_and_what_runs_first(capsys):
    for stage, present, absent in (
        ("train", ["--train-steps", "--seeds", "--no-wait"], ["--tau", "--budget", "--out", "--relearn-steps"]),
        ("select", ["--budget", "--probes", "--train-steps"], ["--tau", "--out"]),
        ("unlearn", ["--tau", "--updates", "--budget"], ["--out", "--relearn-steps"]),
        ("evaluate", ["--relearn-steps", "--out", "--check-reproduction", "--tau"], []),
    ):
        with pytest.raises(SystemExit):
            cli.main([stage, "--help"])
        text = capsys.readouterr().out
        assert all(option in text for option in present), stage
        assert not any(option in text for option in absent), stage
    with pytest.raises(SystemExit):
        cli.main(["unlearn", "--help"])
    assert "Runs after train, curvature, select" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_a_failed_run_leaves_no_empty_directories(tmp_path):
    root = tmp_path / "new" / "seed-0"
    with pytest.raises(RuntimeError, match="power cut"), Workdir(root).lock():
        assert (root / ".lock").read_text().strip() == str(os.getpid())
        raise RuntimeError("power cut")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), Workdir(tmp_path / "kept" / "seed-0").lock():
        (tmp_path / "kept" / "seed-0" / "output").write_text("finished")
        raise RuntimeError
    assert (tmp_path / "kept" / "seed-0" / "output").exists()  # finished work is kept


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(umask, mode, tmp_path):
    from jaxforget.atomic import write_json_atomic

    previous = os.umask(umask)
    try:
        path = write_json_atomic(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_a_process_holding_the_lock_can_run_stages_inside_it(clean_run, tmp_path, capsys):
    work = copy_workdir(clean_run, tmp_path)
    with Workdir(work / "seed-0").lock():  # e.g. a script that locks the directory around its own stage calls
        assert cli.main(["train", *FAST_RUN, "--workdir", str(work), "--no-wait"]) == 0
    assert "train: finished earlier" in capsys.readouterr().out
