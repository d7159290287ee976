"""``jaxforget run --forgetting K``: families of K models through every stage, scored against retrained models."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import SMALL_RUN

from jaxforget import cli, ensembles, forgetting, models, pipeline, settings, unlearn
from jaxforget.workdir import Workdir

K = 4
ARGS = [
    *SMALL_RUN, "--model", "mlp", "--selections", "hessian-largest,random,all",
    "--updates", "first-order,diagonal-newton,finetune", "--forgetting", str(K), "--forgetting-resamples", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def family_run(tmp_path_factory, cli_numerics):
    """One small run with --forgetting 4: its results, config and workdir."""
    root = tmp_path_factory.mktemp("forgetting")
    assert cli.main(["run", *ARGS, "--workdir", str(root / "work"), "--out", str(root / "out"), "--quiet"]) == 0
    results = json.loads((root / "out" / "results.json").read_text())
    config = cli._config(cli._options().parse_args(["run", *ARGS]), 0)
    return results, config, root / "work" / "seed-0"


def test_every_row_carries_the_forgetting_columns_and_the_final_score_is_their_product(family_run):
    results, config, workdir = family_run
    rows = {row["method"]: row for row in results["per_seed"][0]}  # every field the evaluate stage wrote
    assert set(rows) == {"poisoned", "retrained"} | {f"{s}/{u}" for s, u in settings.methods(config)}
    summary = pipeline.stage_record("evaluate", config, workdir)["forgetting"]
    assert summary["models"] == K and summary["examples"] == config.group_size and summary["resamples"] == 2
    for row in rows.values():
        assert 0.0 <= row["forgetting_score"] <= 1.0 and 0.0 <= row["lira_auc"] <= 1.0
        low, high = row["forgetting_interval"]
        assert low <= row["forgetting_score"] <= high or low == high
        expected = (
            row["forgetting_score"]
            * row["family_retain_accuracy"]
            / summary["reference_retain_accuracy"]
            * row["family_test_accuracy"]
            / summary["reference_test_accuracy"]
        )
        assert row["final_score"] == pytest.approx(expected, rel=1e-12)
    assert all(rows[name]["family_seconds_per_model"] > 0 for name in rows if "/" in name)
    assert f"forgetting scored over {K} models per family" in (workdir.parent.parent / "out" / "results.md").read_text()


def test_the_poisoned_row_is_scored_from_its_models_confidences(family_run):
    """The poisoned row's score, recomputed from each poisoned model's own logits on Z (one model at a time)."""
    results, config, workdir = family_run
    setup = pipeline.setup(config)
    store = Workdir(workdir)
    group = setup.scenario.poisoned_group

    def confidences(family):
        variables = pipeline._family(store, setup, config, family)
        logits = []
        for k in range(K):
            one = ensembles.unstack(variables, k)
            logits.append(models.logits_fn_for(setup.model, one["batch_stats"])(one["params"], group.inputs))
        return forgetting.logit_scaled_confidence(np.stack(logits), group.labels)

    poisoned, reference = confidences("poisoned"), confidences("retrained")
    row = next(row for row in results["rows"] if row["method"] == "poisoned")
    assert row["forget_confidence"] == pytest.approx(np.median(poisoned), abs=1e-4)
    summary = pipeline.stage_record("evaluate", config, workdir)["forgetting"]
    assert summary["reference_forget_confidence"] == pytest.approx(np.median(reference), abs=1e-4)
    assert row["forgetting_score"] == pytest.approx(forgetting.forgetting_score_from_confidences(poisoned, reference))
    assert row["lira_auc"] == pytest.approx(forgetting.lira_attack(poisoned, reference).auc, abs=1e-6)


def test_each_family_model_gets_the_single_model_curvature_mask_and_updates(family_run):
    """Model k of the family, taken out and run through the single-model functions, gives what the vmapped stages
    stored for it: its Hessian diagonal, its mask and its unlearned parameters."""
    _, config, workdir = family_run
    setup = pipeline.setup(config)
    store = Workdir(workdir)
    scenario = setup.scenario
    variables = pipeline._family(store, setup, config, "poisoned")
    like = variables["params"]
    curvature = pipeline._arrays(store, pipeline.stage_record("curvature", config, workdir)["family"], like)
    masks = pipeline._arrays(store, pipeline.stage_record("select", config, workdir)["family"], like)
    unlearned = pipeline.stage_record("unlearn", config, workdir)["family"]
    k = 1
    model_k = ensembles.unstack(variables, k)
    params, stats = model_k["params"], model_k["batch_stats"]

    hessian = pipeline._estimators(setup.model, config.probes)["hessian"]
    chunks = pipeline._chunks(scenario.train, pipeline._CURVATURE_BATCH)
    diagonal, _ = pipeline._stream(hessian, params, stats, chunks, jax.random.key(0))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
        diagonal,
        ensembles.unstack(curvature["hessian"], k),
    )

    mask_k = ensembles.unstack(masks["hessian-largest"], k)
    expected_mask = pipeline.selection.select_top(ensembles.unstack(curvature["hessian"], k), config.budget)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, mask_k, expected_mask)))

    def stored(method):
        return ensembles.unstack(pipeline._arrays(store, unlearned[method], like)["params"], k)

    loss_fn = models.loss_fn_for(setup.model, stats)
    tau = settings.hyperparameters(config, "first-order", "hessian-largest")["tau"]
    first_order, _ = unlearn.first_order_update(
        loss_fn, params, scenario.poisoned_group, scenario.corrected, tau=tau, mask=mask_k
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), first_order,
                 stored("hessian-largest/first-order"))  # fmt: skip

    values = settings.hyperparameters(config, "finetune", "hessian-largest")
    finetuning = pipeline._Finetuning(setup, config)
    template = pipeline.restore_model(workdir, "poisoned", config)
    go, steps, _ = finetuning.run(template.replace(params=params, batch_stats=stats), "finetune", mask_k, values)
    final, _ = go(steps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), final.params,
                 stored("hessian-largest/finetune"))  # fmt: skip
    frozen = jax.tree.map(lambda p, q, m: np.array_equal(np.asarray(p)[~m], np.asarray(q)[~m]), params,
                          stored("hessian-largest/finetune"), mask_k)  # fmt: skip
    assert all(jax.tree.leaves(frozen))  # entries outside model k's own mask are bitwise untouched


def test_a_rerun_reuses_the_families_and_a_corrupt_family_is_retrained_to_the_same_numbers(family_run, capsys):
    results, config, workdir = family_run
    out = workdir.parent.parent / "again"
    capsys.readouterr()
    assert cli.main(["run", *ARGS, "--workdir", str(workdir.parent), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "already trained" not in printed  # the whole train stage was reused, families included
    assert "train: finished earlier" in printed and "evaluate: finished earlier" in printed
    damaged = next(workdir.glob("family-retrained.*.npz"))
    damaged.write_bytes(b"not an archive")
    assert cli.main(["run", *ARGS, "--workdir", str(workdir.parent), "--out", str(out), "--quiet"]) == 0
    notice = capsys.readouterr().err
    assert "family-retrained" in notice
    again = json.loads((out / "results.json").read_text())
    for first, second in zip(results["rows"], again["rows"], strict=True):
        assert first["forgetting_score"] == second["forgetting_score"], first["method"]


def test_forgetting_enters_the_stage_keys_only_when_on():
    base = settings.RunConfig(dataset="digits", model="mlp")
    changed = dataclasses.replace(base, forgetting_resamples=99)
    assert all(settings.stage_key(base, s) == settings.stage_key(changed, s) for s in settings.STAGES)
    on = dataclasses.replace(base, forgetting=8)
    assert settings.stage_key(on, "train") != settings.stage_key(base, "train")
    resampled = dataclasses.replace(on, forgetting_resamples=99)
    assert settings.stage_key(resampled, "unlearn") == settings.stage_key(on, "unlearn")
    assert settings.stage_key(resampled, "evaluate") != settings.stage_key(on, "evaluate")


def test_four_devices_split_the_model_axis_and_give_the_same_scores(family_run, tmp_path):
    """The same run in a process with 4 forced host devices: each device holds one model of every family."""
    results, config, _ = family_run
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "jaxforget.cli", "run", *ARGS, "--workdir", str(tmp_path / "work"),
               "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    subprocess.run(command, env=environment, check=True, capture_output=True, timeout=600)
    sharded = json.loads((tmp_path / "out" / "results.json").read_text())
    summary = pipeline.stage_record("evaluate", config, tmp_path / "work" / "seed-0")["forgetting"]
    assert summary["devices"] == 4
    for one, four in zip(results["per_seed"][0], sharded["per_seed"][0], strict=True):
        assert four["family_test_accuracy"] == pytest.approx(one["family_test_accuracy"], abs=1e-3), one["method"]
        assert four["forgetting_score"] == pytest.approx(one["forgetting_score"], abs=0.02), one["method"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"forgetting": 2}, "--forgetting: 2 must be 0 (off) or a number of models in [3, 4096]"),
        ({"forgetting": 5000}, "--forgetting: 5000 must be 0 (off)"),
        ({"forgetting_resamples": 1}, "--forgetting-resamples: 1 must be at least 2"),
        ({"forgetting": 4, "scenario": "canary"}, "--forgetting: the forgetting score is built for the image"),
    ],
)
def test_bad_forgetting_settings_are_refused_naming_the_option(changes, expected):
    with pytest.raises(ValueError) as error:
        settings.check_config(settings.RunConfig(**changes))
    assert expected in str(error.value)


def test_family_seeds_differ_across_families_and_seeds():
    seeds = {
        seed: {f: pipeline._family_seeds(settings.RunConfig(seed=seed, forgetting=5), f) for f in pipeline._FAMILIES}
        for seed in (0, 1)
    }
    every = [s for by_family in seeds.values() for family in by_family.values() for s in family]
    assert len(every) == len(set(every)) == 2 * 3 * 5
    assert not {0, 1} & set(every)  # never a single model's seed
