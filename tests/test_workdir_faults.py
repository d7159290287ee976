"""Faults on purpose, as a user meets them: corrupt, truncated or deleted outputs, garbage records, two runs on one
workdir, a held lock, kill and Ctrl-C, unwritable paths and nonsense values. Each test fails if the fault goes
undetected: a recomputed run must give the clean run's numbers, and a refused one must say why in one line."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest
from conftest import SMALL_RUN

from jaxforget import cli
from jaxforget.workdir import Workdir

FAST = [*SMALL_RUN, "--selections", "hessian-largest,random,all", "--updates", "first-order,diagonal-newton"]
TIMINGS = ("seconds", "gradient_equivalents")


@pytest.fixture(scope="module", autouse=True)
def as_the_cli_runs():
    """The CLI's own numerics in this process too (conftest switches on float64 and another PRNG), so that runs
    here and in subprocesses give the same numbers."""
    saved = jax.config.jax_enable_x64, jax.config.jax_default_prng_impl
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    yield
    jax.config.update("jax_enable_x64", saved[0])
    jax.config.update("jax_default_prng_impl", saved[1])


def _rows(out: pathlib.Path) -> list[dict]:
    """The per-seed rows of results.json without the timings (which differ run to run)."""
    rows = json.loads((out / "results.json").read_text())["per_seed"][0]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A finished workdir and its results, run once for the module."""
    root = tmp_path_factory.mktemp("clean")
    assert cli.main(["run", *FAST, "--workdir", str(root / "work"), "--out", str(root / "out"), "--quiet"]) == 0
    return root


def _copy(clean: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(clean / "work", tmp_path / "work")
    return tmp_path / "work"


def _rerun(work: pathlib.Path, out: pathlib.Path, *extra: str) -> int:
    return cli.main(["run", *FAST, *extra, "--workdir", str(work), "--out", str(out), "--quiet"])


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
def test_a_damaged_output_is_named_and_recomputed_to_the_clean_numbers(fault, clean, tmp_path, capsys):
    work = _copy(clean, tmp_path)
    FAULTS[fault](work)
    capsys.readouterr()
    assert _rerun(work, tmp_path / "out") == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxforget:")]
    assert notices and NAMED[fault] in notices[0] and "recomputing" in notices[0]
    assert "Traceback" not in "\n".join(notices)
    assert _rows(tmp_path / "out") == _rows(clean / "out")
    # The repaired workdir is whole again: a second rerun finds nothing to recompute.
    assert _rerun(work, tmp_path / "out2") == 0
    assert "recomputing" not in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_refused_by_a_stage_that_only_reads_it(clean, tmp_path, capsys):
    work = _copy(clean, tmp_path)
    _flip_bit(_largest_file(_only("retrained.*[!n]", work)))
    assert cli.main(["evaluate", *FAST, "--workdir", str(work), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert "retrained." in error[0] and error[-1].startswith("jaxforget: error: stage 'train'")
    assert not (tmp_path / "out").exists()


_ENTRY = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from jaxforget.cli import main; sys.exit(main())"
)


def _start(args: list[str]) -> subprocess.Popen:
    """``jaxforget ARGS`` in a new process, with Python's own Ctrl-C handling (a test runner may ignore SIGINT)."""
    command = [sys.executable, "-c", _ENTRY, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _without_unlearning(work: pathlib.Path) -> None:
    seed = work / "seed-0"
    shutil.rmtree(seed / "unlearned")
    for pattern in ("unlearn.*.json", "evaluate.*.json"):
        for path in seed.glob(pattern):
            path.unlink()


def test_two_runs_with_different_settings_on_one_workdir_each_report_their_own_numbers(clean, tmp_path):
    # The reproduction of the worst defect: before, the first run reported the second one's unlearned models.
    other = ["--tau", "3e-3", "--damping", "0.5"]
    reference = tmp_path / "reference"
    shutil.copytree(clean / "work", reference)
    assert _rerun(reference, tmp_path / "reference-out", *other) == 0
    work = _copy(clean, tmp_path)
    _without_unlearning(work)
    common = [*FAST, "--workdir", str(work), "--quiet"]
    first = _start(["run", *common, "--out", str(tmp_path / "first")])
    time.sleep(2)
    second = _start(["run", *common, *other, "--out", str(tmp_path / "second")])
    for process in (first, second):
        _, error = process.communicate(timeout=600)
        assert process.returncode == 0, error
    assert _rows(tmp_path / "first") == _rows(clean / "out")
    assert _rows(tmp_path / "second") == _rows(tmp_path / "reference-out")
    assert _rows(tmp_path / "first") != _rows(tmp_path / "second")


def test_a_second_run_waits_for_the_lock_or_fails_at_once_with_no_wait(clean, tmp_path):
    work = _copy(clean, tmp_path)
    args = ["train", *FAST, "--workdir", str(work), "--quiet"]
    with Workdir(work / "seed-0").lock():
        refused = _start([*args, "--no-wait"])
        _, error = refused.communicate(timeout=300)
        assert refused.returncode == 2
        assert error.strip() == (
            f"jaxforget: error: --workdir: {work / 'seed-0'} is in use by another jaxforget run (pid {os.getpid()}); "
            "wait for it (drop --no-wait), or choose another --workdir."
        )
        waiting = _start(args)
        time.sleep(8)
        assert waiting.poll() is None  # still waiting for the lock
    _, error = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and f"waiting for the jaxforget run with pid {os.getpid()}" in error


def _signal_mid_unlearn(clean, tmp_path, signum) -> tuple[subprocess.Popen, pathlib.Path, str]:
    """Starts a run that must unlearn, and sends ``signum`` once the first unlearned model is on disk."""
    work = _copy(clean, tmp_path)
    _without_unlearning(work)
    process = _start(["run", *FAST, "--workdir", str(work), "--out", str(tmp_path / "out"), "--quiet"])
    deadline = time.monotonic() + 300
    while not list((work / "seed-0").glob("unlearned/*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, error = process.communicate(timeout=300)
    return process, work, error


def test_a_killed_run_resumes_to_the_clean_numbers(clean, tmp_path):
    process, work, _ = _signal_mid_unlearn(clean, tmp_path, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not list((work / "seed-0").glob("evaluate.*.json"))  # it died before finishing
    assert _rerun(work, tmp_path / "resumed") == 0
    assert _rows(tmp_path / "resumed") == _rows(clean / "out")


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_or_sigterm_ends_in_one_line_and_keeps_what_finished(signum, code, word, clean, tmp_path):
    process, work, error = _signal_mid_unlearn(clean, tmp_path, signum)
    assert process.returncode == code, error
    assert "Traceback" not in error
    assert error.strip().splitlines()[-1] == f"jaxforget: {word}; finished stages are kept, rerun to resume"
    assert list((work / "seed-0").glob("unlearned/*.json"))  # kept
    assert _rerun(work, tmp_path / "resumed") == 0
    assert _rows(tmp_path / "resumed") == _rows(clean / "out")


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


def test_evaluate_alone_reports_every_stage_time(clean, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["evaluate", *FAST, "--workdir", str(clean / "work"), "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert set(record["stage_seconds"][0]) == {"train", "curvature", "select", "unlearn", "evaluate"}
    assert record["curvature"][0]["samples"] > 0
    assert _rows(out) == _rows(clean / "out")


def test_results_record_the_machine_and_versions(clean):
    record = json.loads((clean / "out" / "results.json").read_text())
    assert record["versions"]["jax"] and record["versions"]["jaxlib"] and record["versions"]["flax"]
    assert record["machine"]["cpu"]["model"] and record["machine"]["backend"] == "cpu"
    assert record["machine"]["devices"][0].startswith("cpu:0")


def test_check_reproduction_passes_the_same_run_and_flags_a_changed_number(clean, tmp_path, capsys):
    args = ["evaluate", *FAST, "--workdir", str(clean / "work"), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main([*args, "--check-reproduction", str(clean / "out")]) == 0
    assert "0 beyond it" in capsys.readouterr().out
    tampered = json.loads((clean / "out" / "results.json").read_text())
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
