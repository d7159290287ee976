"""The main job end to end on a tiny configuration: files, table rows, resuming, stages one by one, bad options."""

import json

import pytest
from conftest import SMALL_RUN as SMALL

from jaxforget import cli, pipeline, settings

TINY = [
    *SMALL, "--updates", "first-order,diagonal-newton,finetune,cg", "--cg-iterations", "2", "--hessian-samples", "64",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    args = ["run", *TINY, "--workdir", str(root / "work"), "--out", str(root / "out"), "--quiet"]
    assert cli.main(args) == 0
    return root, args


def test_run_writes_every_file_and_a_row_per_method(tiny_run, capsys):
    root, _ = tiny_run
    record = json.loads((root / "out" / "results.json").read_text())
    assert record["command"].startswith("jaxforget run --dataset digits") and record["versions"]["jax"]
    assert record["machine"]["cpus"] >= 1
    curvature = record["curvature"][0]
    assert curvature["samples"] == curvature["reference_samples"] > 200 and 0 <= curvature["zero_share"] < 1
    methods = [row["method"] for row in record["rows"]]
    expected = ["poisoned", "retrained"]
    for update in ("first-order", "diagonal-newton", "finetune"):
        expected += [f"{s}/{update}" for s in settings.SELECTIONS]
    expected += ["hessian-largest/cg", "all/cg"]
    assert methods == expected
    rows = {row["method"]: row for row in record["rows"]}
    assert rows["retrained"]["fidelity_test"] == 1.0 and rows["retrained"]["fidelity_group"] == 1.0
    poisoned, retrained = rows["poisoned"]["test_accuracy"], rows["retrained"]["test_accuracy"]
    assert poisoned != retrained and rows["retrained"]["accuracy_restored"] == pytest.approx(1.0)
    for name in ("hessian-largest", "hessian-smallest-nonzero", "last-layers", "random"):
        assert rows[f"{name}/first-order"]["fraction"] == pytest.approx(0.01, abs=1e-4), name
    assert rows["last-layer/finetune"]["fraction"] < 0.5 and rows["all/finetune"]["fraction"] == 1.0
    # The curvature is the whole training set's, and recall is scored against it: the rule itself finds all of it.
    assert rows["hessian-largest/first-order"]["top_k_recall"] == 1.0
    assert rows["random/first-order"]["top_k_recall"] < 0.2
    # A rule that moves nothing scores exactly as the poisoned model does.
    unchanged = ("test_accuracy", "group_accuracy", "mia_auc", "fidelity_test")
    assert all(rows["hessian-smallest/first-order"][k] == rows["poisoned"][k] for k in unchanged)
    # The seed's own rows keep each method's details. Every fine-tuning step saw a batch of Z~: 3 steps over 20
    # samples in batches of 20 (the group is smaller than --batch-size).
    rows = {row["method"]: row for row in record["per_seed"][0]}
    assert rows["random/finetune"]["samples_seen"] == {"corrected": 60, "retained": 60}
    assert rows["hessian-largest/cg"]["converged"] in (True, False) and rows["hessian-largest/cg"]["residual"] >= 0
    share = rows["hessian-largest/diagonal-newton"]["curvature_share"]
    assert 0.0 <= share <= 1.0 and rows["random/first-order"]["curvature_share"] is None
    markdown = (root / "out" / "results.md").read_text()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == len(expected) + 1  # + the header
    assert (root / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((root / "work" / "seed-0").glob("poisoned.*/LATEST"))) == 1


def test_rerun_resumes_and_a_changed_setting_reruns_only_what_depends_on_it(tiny_run, capsys):
    root, args = tiny_run
    capsys.readouterr()
    assert cli.main([a for a in args if a != "--quiet"]) == 0
    out = capsys.readouterr().out
    assert all(f"{stage}: finished earlier" in out for stage in pipeline.STAGES)
    changed = [a for a in args if a != "--quiet"] + ["--budget", "0.05"]
    assert cli.main(changed) == 0
    out = capsys.readouterr().out
    assert "train: finished earlier" in out and "curvature: finished earlier" in out
    assert "select: finished earlier" not in out and f"select: {len(settings.SELECTIONS)} masks" in out
    record = json.loads((root / "out" / "results.json").read_text())
    assert {row["method"]: row for row in record["rows"]}["random/finetune"]["fraction"] == pytest.approx(0.05, 1e-3)


def test_a_stage_needs_the_ones_before_it(tmp_path, capsys):
    assert cli.main(["select", *TINY, "--workdir", str(tmp_path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "jaxforget train" in error


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--budget", "1.5"], "--budget"),
        (["--selections", "hessian-largest,biggest"], "biggest"),
        (["--model", "vgg"], "--model"),
        (["--seeds", "0,zero"], "--seeds"),
        (["--group-size", "0"], "--group-size"),
    ],
)
def test_bad_options_get_one_line_naming_the_option(options, fragment, tmp_path, capsys):
    assert cli.main(["run", *options, "--workdir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and fragment in error
    assert not any(tmp_path.iterdir())  # nothing computed, nothing written


def test_missing_tfds_data_fails_fast_naming_the_fix(tmp_path, capsys):
    assert (
        cli.main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--workdir", str(tmp_path)]) == 2
    )
    assert "--download" in capsys.readouterr().err


def test_a_crash_mid_stage_keeps_what_had_finished(tiny_run, tmp_path, monkeypatch):
    import shutil

    from jaxforget import unlearn

    root, _ = tiny_run
    workdir = tmp_path / "work"
    shutil.copytree(root / "work", workdir)
    seed_dir = workdir / "seed-0"
    for path in [*seed_dir.glob("unlearn.*.json"), *seed_dir.glob("evaluate.*.json"), *seed_dir.glob("unlearned/*")]:
        path.unlink()
    args = ["run", *TINY, "--workdir", str(workdir), "--out", str(tmp_path / "out"), "--quiet"]

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(unlearn, "finetune_unlearn", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        cli.main(args)
    assert not list(seed_dir.glob("unlearn.*.json"))
    finished = {p.name: p.stat().st_mtime_ns for p in (seed_dir / "unlearned").iterdir()}
    names = {name.split(".")[0] + "." + name.rsplit(".", 1)[1] for name in finished}  # without the key
    assert "hessian-largest--first-order.npz" in names and "all--diagonal-newton.json" in names
    assert not any("finetune" in name for name in finished)

    monkeypatch.undo()
    assert cli.main(args) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (seed_dir / "unlearned").iterdir()}
    assert all(after[name] == mtime for name, mtime in finished.items())  # reused, not recomputed
    assert list(seed_dir.glob("unlearn.*.json")) and any("finetune" in name for name in after)
