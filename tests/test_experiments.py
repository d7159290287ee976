"""The experiment scripts on tiny data: the tuning chooses on validation, records everything, never reads test."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
from conftest import SMALL_RUN

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [*SMALL_RUN, "--selections", "hessian-largest,random"]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tuning(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    tune = _script("tune")
    args = ["--seeds", "100", "--updates", "first-order,finetune", "--out", str(root), "--workdir", str(root / "w")]
    assert tune.main([*args, "--no-install", *TINY]) == 0
    return tune, json.loads((root / "label-flip.json").read_text())


def test_tuning_records_the_grid_every_score_and_the_choice(tuning):
    tune, record = tuning
    assert record["seeds"] == [100] and record["grids"]["first-order"] == tune.GRIDS["label-flip"]["first-order"]
    seed = record["per_seed"][0]
    floor = seed["poisoned"]["validation_accuracy"] - 0.01
    for rule in ("hessian-largest", "random"):
        entries = seed["updates"]["first-order"][rule]
        assert [e["tau"] for e in entries] == sorted(tune.GRIDS["label-flip"]["first-order"]["tau"])
        admissible = [e for e in entries if e["validation_accuracy"] >= floor]
        chosen = record["chosen"]["first-order"]["tau"][rule]
        if admissible:
            best = max(e["objective"] for e in admissible)
            pick = next(e for e in admissible if e["tau"] == chosen)
            assert pick["objective"] == best
        else:
            assert (
                chosen == min(tune.GRIDS["label-flip"]["first-order"]["tau"])
                and not record["chosen"]["first-order"]["admissible"][rule]
            )
    finetune = record["chosen"]["finetune"]
    assert finetune["finetune_lr"] in tune.GRIDS["label-flip"]["finetune"]["finetune_lr"]
    assert finetune["finetune_steps"] in tune.GRIDS["label-flip"]["finetune"]["finetune_steps"]
    assert len(seed["updates"]["finetune"]["hessian-largest"]) == len(tune._grid_points("label-flip", "finetune"))


def test_tuning_scores_on_validation_and_the_group_never_on_test(tuning):
    tune, record = tuning
    entry = record["per_seed"][0]["updates"]["first-order"]["random"][0]
    assert set(entry) >= {"tau", "validation_accuracy", "group_accuracy", "objective", "finite"}
    assert not any("test" in key for key in entry)
    assert np.isclose(entry["objective"], entry["group_accuracy"])


def test_tuning_refuses_seeds_that_the_results_report(tmp_path):
    with pytest.raises(SystemExit):
        _script("tune").main(["--seeds", "0,100", "--out", str(tmp_path), "--no-install", *TINY])


def test_forgetting_models_scores_both_ends_of_the_scale(tmp_path):
    """Models that forgot nothing are told apart from retrained ones; two sets of retrained models much less so."""
    script = _script("forgetting_models")
    argv = ["--ks", "3,4", "--resamples", "2", "--out", str(tmp_path), *SMALL_RUN, "--group-size", "40"]
    argv += ["--train-steps", "300"]  # enough for the poisoned models to fit the flipped labels
    assert script.main(argv) == 0
    record = json.loads((tmp_path / "digits-mlp.json").read_text())
    assert record["models"] == {"poisoned": 4, "retrained": 8} and record["group_size"] == 40
    rows = {(row["k"], row["pair"]): row for row in record["rows"]}
    assert set(rows) == {(k, pair) for k in (3, 4) for pair in ("poisoned vs retrained", "retrained vs retrained")}
    for row in rows.values():
        assert 0.0 <= row["forgetting_score"] <= 1.0 and 0.0 <= row["lira_auc"] <= 1.0
        assert row["interval"][0] <= row["forgetting_score"] <= row["interval"][1]
    for k in (3, 4):  # the flipped labels: every poisoned model fits them, no retrained one does
        assert rows[(k, "poisoned vs retrained")]["lira_auc"] > rows[(k, "retrained vs retrained")]["lira_auc"] + 0.2
