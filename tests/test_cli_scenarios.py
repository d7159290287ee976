"""The main job with a batch-norm ResNet, and with a backdoor over two seeds (each in its own file from test_cli.py,
so that pytest-xdist runs them beside it)."""

import json

import pytest
from conftest import SMALL_RUN as SMALL

from jaxforget import cli, pipeline


def test_a_batch_norm_model_is_scored_with_its_own_statistics(tmp_path):
    import jax
    import numpy as np

    from jaxforget import train

    args = [
        *SMALL, "--model", "resnet18", "--width", "4", "--selections", "hessian-largest,random,all",
        "--updates", "first-order,finetune",
    ]  # fmt: skip
    assert cli.main(["run", *args, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    rows = {row["method"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    config = cli._config(cli._options().parse_args(["run", *args]), 0)
    workdir = tmp_path / "work" / "seed-0"
    poisoned = pipeline.restore_model(workdir, "poisoned", config)
    retrained = pipeline.restore_model(workdir, "retrained", config)
    differ = jax.tree.map(lambda a, b: not np.allclose(a, b), poisoned.batch_stats, retrained.batch_stats)
    assert any(jax.tree.leaves(differ))  # the two models' running statistics really differ
    test = pipeline.setup(config).test
    expected = train.evaluate(retrained, test, jax.jit(train.eval_step))["accuracy"]
    assert rows["retrained"]["test_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert rows["retrained"]["fidelity_test"] == 1.0 and rows["retrained"]["fidelity_group"] == 1.0
    assert rows["hessian-largest/first-order"]["top_k_recall"] == 1.0


def test_a_backdoor_over_two_seeds_reports_paired_differences(tmp_path):
    args = [
        *SMALL, "--scenario", "backdoor", "--correction", "relabel", "--seeds", "0,1",
        "--selections", "hessian-largest,gnb-largest,random", "--updates", "first-order,finetune-ascent",
    ]  # fmt: skip
    assert cli.main(["run", *args, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["config"]["seeds"] == [0, 1] and len(record["per_seed"]) == 2
    assert record["config"]["correction"] == "relabel"
    first, second = ({row["method"]: row for row in rows} for rows in record["per_seed"])
    mean = {row["method"]: row for row in record["rows"]}
    key = "random/finetune-ascent"
    expected = (first[key]["group_accuracy"] + second[key]["group_accuracy"]) / 2
    assert mean[key]["group_accuracy"] == pytest.approx(expected)
    assert first[key]["data"] == "Z~ + retained - ascent on Z" and "ascent" in first[key]["samples_seen"]
    paired = record["paired"]
    assert len(paired) == 2 * 2 * 6  # updates x other rules x metrics
    assert {c["other"] for c in paired} == {"gnb-largest", "random"} and all(c["n"] == 2 for c in paired)
    some = next(c for c in paired if c["update"] == "first-order" and c["other"] == "random")
    difference = first["hessian-largest/first-order"][some["metric"]] - first["random/first-order"][some["metric"]]
    difference += second["hessian-largest/first-order"][some["metric"]] - second["random/first-order"][some["metric"]]
    assert some["mean_difference"] == pytest.approx(difference / 2)
    assert "## Paired differences" in (tmp_path / "out" / "results.md").read_text()
