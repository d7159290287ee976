"""The training recipe of the paper-scale runs: crop-and-flip augmentation, SGD with a cosine schedule, weight decay,
the compute precision, and the settings that select them (checked before compute, out of the keys by default)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxforget import data, pipeline, settings
from jaxforget.models import Batch
from jaxforget.settings import RunConfig


def images(count=6, size=5, channels=2):
    values = np.arange(count * size * size * channels, dtype=np.float32) + 1.0  # no zeros: padding shows as 0
    return Batch(values.reshape(count, size, size, channels), np.arange(count, dtype=np.int32))


def test_crop_flip_is_a_shifted_window_of_the_padded_image_or_its_mirror():
    batch, pad = images(count=64), 2
    out = data.crop_flip(batch, np.random.default_rng(0), pad=pad)
    assert out.inputs.shape == batch.inputs.shape and out.inputs.dtype == batch.inputs.dtype
    np.testing.assert_array_equal(out.labels, batch.labels)
    padded = np.pad(batch.inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    flipped = 0
    for i in range(64):
        windows = [
            padded[i, top : top + 5, left : left + 5] for top in range(2 * pad + 1) for left in range(2 * pad + 1)
        ]
        plain = any(np.array_equal(out.inputs[i], w) for w in windows)
        mirrored = any(np.array_equal(out.inputs[i], w[:, ::-1]) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 16 <= flipped <= 48  # about half are mirrored
    assert not np.array_equal(out.inputs, batch.inputs)


def test_crop_flip_is_reproducible_and_pad_zero_only_flips():
    batch = images()
    first = data.crop_flip(batch, np.random.default_rng(3))
    np.testing.assert_array_equal(first.inputs, data.crop_flip(batch, np.random.default_rng(3)).inputs)
    only_flips = data.crop_flip(batch, np.random.default_rng(3), pad=0)
    for i in range(len(batch.labels)):
        x = only_flips.inputs[i]
        assert np.array_equal(x, batch.inputs[i]) or np.array_equal(x, batch.inputs[i][:, ::-1])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"pad": -1}, "pad=-1"), ({"batch": Batch(np.zeros((2, 3)), np.zeros(2))}, "images")],
)
def test_crop_flip_rejects_bad_input(kwargs, match):
    arguments = {"batch": images(), "rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        data.crop_flip(**arguments)


def test_sgd_recipe_warms_up_then_decays_on_a_cosine_with_l2_decay():
    config = RunConfig(optimizer="sgd", weight_decay=0.1, train_steps=100)
    assert config.learning_rate == 0.1  # sgd's default peak rate
    tx = pipeline.training_optimizer(config)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    steps = []
    for _ in range(100):
        updates, state = tx.update({"w": jnp.zeros(3)}, state, params)  # no gradient: only the L2 decay acts
        steps.append(float(-updates["w"][0]))
    # The rate starts at 0 (warm-up over 2% of the steps), peaks early, and the cosine takes it back to 0.
    assert steps[0] == 0.0 and steps[1] > 0.0
    assert int(np.argmax(steps)) < 30
    assert steps[-1] < 0.01 * max(steps)
    # At most rate x decay x weight x Nesterov's 1 + 0.9 / (1 - 0.9) at steady state; the momentum still builds up.
    assert 0.05 < max(steps) < 0.1 * 0.1 * 10


def test_adam_recipe_is_plain_adam_unless_decayed():
    params = {"w": jnp.ones(2)}
    grads = {"w": jnp.array([0.5, -1.0])}
    plain = pipeline.training_optimizer(RunConfig())
    reference = optax.adam(1e-3)
    got, _ = plain.update(grads, plain.init(params), params)
    want, _ = reference.update(grads, reference.init(params), params)
    np.testing.assert_array_equal(got["w"], want["w"])
    decayed = pipeline.training_optimizer(RunConfig(weight_decay=0.5))
    got, _ = decayed.update({"w": jnp.zeros(2)}, decayed.init(params), params)
    assert np.all(np.asarray(got["w"]) < 0)  # AdamW's decoupled decay shrinks the weights without a gradient


def test_recipe_settings_enter_the_train_key_only_when_changed():
    base = RunConfig()
    for change in ({"optimizer": "sgd"}, {"weight_decay": 5e-4}, {"augment": "crop-flip"}, {"precision": "bfloat16"}):
        changed = dataclasses.replace(base, **change)
        assert settings.stage_key(changed, "train") != settings.stage_key(base, "train"), change
    # The defaults spelled out give the same keys, and --devices is no stage setting.
    explicit = dataclasses.replace(base, optimizer="adam", weight_decay=0.0, augment="none", precision="float32")
    assert all(settings.stage_key(explicit, s) == settings.stage_key(base, s) for s in settings.STAGES)
    assert settings.stage_key(dataclasses.replace(base, devices=2), "evaluate") == settings.stage_key(base, "evaluate")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"optimizer": "lamb"}, "--optimizer: 'lamb'"),
        ({"augment": "mixup"}, "--augment: 'mixup'"),
        ({"precision": "float16"}, "--precision: 'float16'"),
        ({"weight_decay": -1.0}, "--weight-decay: -1.0"),
        ({"weight_decay": float("nan")}, "--weight-decay: nan"),
        ({"augment": "crop-flip", "forgetting": 4}, "--augment: crop-flip applies to a single image model"),
        ({"precision": "bfloat16", "scenario": "canary"}, "--precision: bfloat16 is for the image models"),
        ({"devices": -1}, "--devices: -1"),
    ],
)
def test_bad_recipe_settings_fail_before_compute(change, match):
    with pytest.raises(ValueError, match=match):
        settings.check_config(RunConfig(**change))


def test_bfloat16_setting_builds_a_bfloat16_model_with_float32_parameters():
    config = RunConfig(dataset="digits", model="mlp", precision="bfloat16", validation_size=200, holdout_size=200)
    setup_ = pipeline.setup(config)
    assert setup_.model.dtype == jnp.bfloat16
    params = pipeline._params_like(setup_, config)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)}


def test_more_devices_than_present_is_a_one_line_error_before_compute(tmp_path, capsys):
    from conftest import SMALL_RUN

    from jaxforget import cli

    status = cli.main(["run", *SMALL_RUN, "--devices", "64", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("jaxforget: error: --devices: 64 asked for, but JAX sees 1") and "\n" not in error
    assert not (tmp_path / "w").exists()
