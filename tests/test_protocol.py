"""The main job's protocol, piece by piece: disjoint splits, costs, timing, no dropped samples, tuned settings."""

import dataclasses
import json
import pathlib
import time

import numpy as np
import pytest

from jaxforget import models, pipeline, settings

SMALL = settings.RunConfig(dataset="digits", group_size=20, validation_size=200, holdout_size=200, batch_size=32)


def _rows(batch):
    return {row.tobytes() for row in np.asarray(batch.inputs).reshape(len(batch.labels), -1)}


def test_validation_holdout_training_and_test_are_disjoint_and_the_same_for_every_seed():
    setup = pipeline.setup(SMALL)
    train, validation = setup.scenario.clean, setup.validation
    attack = setup.attack
    assert len(validation.labels) == pytest.approx(200, abs=10) and len(attack.labels) == pytest.approx(200, abs=10)
    parts = [_rows(train), _rows(validation), _rows(attack), _rows(setup.test)]
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not parts[i] & parts[j], (i, j)
    # Membership non-members are held-out samples poisoned like Z, as many as Z.
    assert len(setup.non_members.labels) == SMALL.group_size and _rows(setup.non_members) <= _rows(attack)
    other_seed = pipeline.setup(dataclasses.replace(SMALL, seed=3))
    assert _rows(other_seed.validation) == _rows(validation)
    assert not np.array_equal(other_seed.scenario.group, setup.scenario.group)


def test_splits_that_leave_too_little_training_data_are_refused_naming_the_options():
    with pytest.raises(ValueError, match="--batch-size: 32 .* --validation-size 900 and --holdout-size 500 .* 18"):
        pipeline.setup(dataclasses.replace(SMALL, validation_size=900, holdout_size=500))
    with pytest.raises(ValueError, match="--validation-size 1000 and --holdout-size 500 leave 0 .* at most 1436"):
        pipeline.setup(dataclasses.replace(SMALL, validation_size=1000, holdout_size=500))


def test_chunks_keep_the_remainder():
    batch = models.Batch(np.arange(200.0)[:, None], np.arange(200))
    chunks = pipeline._chunks(batch, 64)
    assert [len(c.labels) for c in chunks] == [64, 64, 64, 8]
    assert np.array_equal(np.concatenate([c.labels for c in chunks]), batch.labels)


def test_finetuning_sees_every_corrected_sample():
    setup = pipeline.setup(dataclasses.replace(SMALL, group_size=50, batch_size=16))
    finetuning = pipeline._Finetuning(setup, dataclasses.replace(SMALL, group_size=50, batch_size=16))
    assert sum(len(b.labels) for b in finetuning.new) == 50 and sum(len(b.labels) for b in finetuning.old) == 50


def test_the_cost_of_a_method_is_the_sum_of_the_curvature_it_needs():
    curvature = {"seconds": {"hessian": 10.0, "gnb": 1.0, "fisher": 4.0}}
    select = {"masks": {name: {"seconds": 0.5} for name in ("gnb-largest", "hessian-largest", "random", "last-layers")}}
    cost = pipeline._selection_cost
    assert cost("gnb-largest", "first-order", curvature, select) == pytest.approx(1.5)
    assert cost("gnb-largest", "diagonal-newton", curvature, select) == pytest.approx(11.5)  # both, not the max
    assert cost("hessian-largest", "diagonal-newton", curvature, select) == pytest.approx(10.5)  # once
    assert cost("random", "finetune", curvature, select) == pytest.approx(0.5)
    assert cost("random", "diagonal-newton", curvature, select) == pytest.approx(10.5)
    assert cost("last-layers", "first-order", curvature, select) == pytest.approx(10.5)


def test_timing_is_the_median_of_the_repeats_after_a_warm_up():
    durations = iter([0.05, 0.0, 0.03, 0.001])  # warm-up (compilation), then three timed runs
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(next(durations))
        return x + 1

    output, seconds = pipeline._median_seconds(fn, (1,), 3)
    assert output == 2 and len(calls) == 4
    assert 0.001 <= seconds < 0.02  # the median of (0, 0.03, 0.001) is 0.001; the warm-up's 0.05 is excluded


def test_hyperparameters_come_from_the_tuned_file_unless_an_option_overrides_them():
    config = settings.RunConfig()
    tuned = settings.tuned_values()["scenarios"]["label-flip"]
    for rule in ("hessian-largest", "random"):
        values = settings.hyperparameters(config, "first-order", rule)
        assert values["tau"] == tuned["first-order"]["tau"][rule] and values["source"] == "tuned"
    overridden = settings.hyperparameters(dataclasses.replace(config, tau=1e-7), "first-order", "random")
    assert overridden["tau"] == 1e-7 and overridden["source"] == "option"
    finetune = settings.hyperparameters(config, "finetune", "random")
    assert finetune["finetune_lr"] == tuned["finetune"]["finetune_lr"]
    assert settings.stage_key(config, "unlearn") != settings.stage_key(dataclasses.replace(config, tau=1e-7), "unlearn")
    assert settings.stage_key(config, "select") == settings.stage_key(dataclasses.replace(config, tau=1e-7), "select")


def test_the_tuned_defaults_are_the_values_the_tuning_experiment_chose():
    root = pathlib.Path(__file__).resolve().parents[1]
    tuned = settings.tuned_values()
    assert tuned["scenarios"], "jaxforget/tuned.json holds no tuned scenario"
    for scenario, source in tuned["sources"].items():
        record = json.loads((root / source).read_text())
        assert record["scenario"] == scenario and min(record["seeds"]) >= 100  # tuning seeds, never reported ones
        for update, chosen in record["chosen"].items():
            assert tuned["scenarios"][scenario][update] == {k: v for k, v in chosen.items() if k != "admissible"}


@pytest.mark.parametrize(
    "change, option",
    [
        ({"tau": float("inf")}, "--tau"),
        ({"damping": -1.0}, "--damping"),
        ({"finetune_steps": 0}, "--finetune-steps"),
        ({"width": 8}, "--width"),
        ({"curvature_samples": -1}, "--curvature-samples"),
        ({"correction": "erase"}, "--correction"),
        ({"timing_repeats": 0}, "--timing-repeats"),
    ],
)
def test_bad_settings_name_the_option(change, option):
    with pytest.raises(ValueError, match=option):
        settings.check_config(dataclasses.replace(settings.RunConfig(), **change))


def test_the_drift_bound_covers_the_measured_drift():
    from jaxforget import reproduction

    root = pathlib.Path(__file__).resolve().parents[1]
    summary = json.loads((root / "experiments" / "results" / "drift" / "summary.json").read_text())
    assert set(summary["largest"]) == set(reproduction.DRIFT)
    for metric, largest in summary["largest"].items():
        assert largest <= reproduction.DRIFT[metric], metric
    assert all(variant["values_differ"] > 0 for variant in summary["variants"].values())  # the variants did drift
