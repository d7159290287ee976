"""The main job on the canary scenario at a tiny size: a character-level Transformer, a secret in the training text,
its exposure and extraction after every method (its own file, so that pytest-xdist runs it beside the others)."""

import json
import math

from jaxforget import cli, pipeline, settings

TINY_CANARY = [
    "--scenario", "canary", "--context", "32", "--train-steps", "20", "--batch-size", "16", "--probes", "1",
    "--curvature-samples", "64", "--secret-length", "2", "--repetitions", "4", "--finetune-steps", "2",
    "--selections", "hessian-largest,random,all", "--updates", "first-order,finetune", "--timing-repeats", "1",
    "--relearn-steps", "2",
]  # fmt: skip


def test_a_canary_run_scores_exposure_extraction_and_bits_per_character(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", *TINY_CANARY, "--workdir", str(tmp_path / "work"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "transformer on pydoc-topics, a 2-digit canary inserted 4 times" in printed
    assert "the Hessian rules rank by the Monte Carlo GGN, 8 sampled label sequences per window" in printed
    record = json.loads((out / "results.json").read_text())
    assert record["curvature"][0]["samples"] == 64
    rows = {row["method"]: row for row in record["per_seed"][0]}
    assert list(rows) == [
        "poisoned", "retrained", "hessian-largest/first-order", "random/first-order", "all/first-order",
        "hessian-largest/finetune", "random/finetune", "all/finetune",
    ]  # fmt: skip
    for name, row in rows.items():
        assert 0.0 <= row["exposure"] <= math.log2(100) + 1e-9, name  # 100 candidate secrets
        assert row["attack_success"] in {0.0, 0.5, 1.0}, name  # share of the 2 digits greedy decoding reproduces
        assert 1.0 < row["bits_per_char"] < 8.0, name  # a few bits: better than uniform over ~100 characters
        assert row["accuracy_restored"] is None, name  # the canary costs no accuracy to restore
    # Fine-tuning every parameter moves the model: its canary scores are its own, not copies of the poisoned row's.
    assert rows["all/finetune"]["bits_per_char"] != rows["poisoned"]["bits_per_char"]
    assert rows["all/finetune"]["exposure"] != rows["poisoned"]["exposure"]
    header = (out / "results.md").read_text().splitlines()[2]
    assert "exposure" in header and "bits/char" in header
    # The configuration's setup: Z are the windows holding the secret; the Hessian rule's estimator is named.
    config = cli._config(cli._options().parse_args(["run", *TINY_CANARY]), 0)
    setup = pipeline.setup(config)
    poisoned, corrected = setup.scenario.poisoned_group, setup.scenario.corrected
    assert (poisoned.labels != corrected.labels).any()  # Z~ carries another secret
    assert (poisoned.inputs[:, 1:] == poisoned.labels[:, :-1]).all()  # next-character windows
    assert 1 <= setup.scenario.size <= 8
    assert "Monte Carlo GGN" in pipeline.hessian_estimator(config)


def test_canary_settings_pick_text_and_a_language_model_and_refuse_mismatches():
    config = settings.RunConfig(scenario="canary")
    assert (config.dataset, config.model) == ("pydoc-topics", "transformer")
    for bad, option in (
        ({"scenario": "canary", "model": "mlp"}, "--model"),
        ({"scenario": "label-flip", "dataset": "pydoc-topics"}, "--dataset"),
        ({"scenario": "canary", "context": 4}, "--context"),
    ):
        try:
            settings.check_config(settings.RunConfig(**bad))
        except ValueError as error:
            assert str(error).startswith(option)
        else:
            raise AssertionError(f"{bad} was accepted")
    # Image runs keep their stage keys whatever the canary settings say.
    assert settings.stage_key(settings.RunConfig(), "evaluate") == settings.stage_key(
        settings.RunConfig(repetitions=3), "evaluate"
    )


def test_the_canary_trains_faster_by_default_and_an_explicit_rate_wins():
    """3e-3 memorizes the secret in the default 500 steps (experiments/results/canary-memorization); images keep 1e-3
    and their stage keys."""
    assert settings.RunConfig(scenario="canary").learning_rate == 3e-3
    assert settings.RunConfig().learning_rate == 1e-3
    assert settings.RunConfig(scenario="canary", learning_rate=1e-3).learning_rate == 1e-3
    assert settings.stage_key(settings.RunConfig(), "train") == settings.stage_key(
        settings.RunConfig(text_characters=5000), "train"
    )
    canary = settings.RunConfig(scenario="canary")
    assert settings.stage_key(canary, "train") != settings.stage_key(
        settings.RunConfig(scenario="canary", text_characters=5000), "train"
    )


def test_a_corpus_too_short_for_the_splits_or_the_canary_is_refused_naming_text_characters(tmp_path, capsys):
    cases = (("1000", "8", "use at least 1,300 characters"), ("1400", "100", "repetitions"))
    for characters, repetitions, fix in cases:
        work = tmp_path / characters
        argv = ["run", "--scenario", "canary", "--text-characters", characters, "--repetitions", repetitions]
        argv += ["--batch-size", "4"]
        assert cli.main([*argv, "--workdir", str(work), "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("jaxforget: error: --text-characters") and fix in error, error
        assert len(error.splitlines()) == 1 and not work.exists()
    try:
        settings.check_config(settings.RunConfig(scenario="canary", text_characters=-1))
    except ValueError as error:
        assert str(error).startswith("--text-characters")
    else:
        raise AssertionError("a negative --text-characters was accepted")
