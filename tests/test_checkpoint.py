"""Checkpoints: bitwise round trips, restoring under another optimizer, clear errors, and atomic saves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxforget as jf
import jaxforget.checkpoint as checkpoint
from jaxforget.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from jaxforget.train import create_train_state, train_step

INPUT_SHAPE = (2, 8, 8, 1)
MODEL = jf.CNN(features=(3, 4), hidden=8, use_batch_norm=True)


def init_fn(model, tx):
    """``create_train_state`` under jit (eager Flax initialization is slow on CPU)."""
    return jax.jit(lambda key: create_train_state(model, key, INPUT_SHAPE, tx))


# One jitted initializer for the trained state and the fresh targets, compiled once.
init_adam = init_fn(MODEL, optax.adam(1e-2))


def abstract_state(model, tx):
    """A state of shapes and dtypes only (``jax.eval_shape``): nothing is initialized or compiled."""
    return jax.eval_shape(lambda key: create_train_state(model, key, INPUT_SHAPE, tx), jax.random.key(0))


def leaf_bits(tree) -> list[tuple[str, np.dtype, tuple, bytes]]:
    """Path, dtype, shape and raw bytes of every leaf: equal lists mean bitwise-equal trees (-0.0 differs from 0.0)."""
    return [
        (jax.tree_util.keystr(path), np.asarray(leaf).dtype, np.shape(leaf), np.asarray(leaf).tobytes())
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


@pytest.fixture(scope="module")
def trained():
    """A CNN with batch norm after three Adam steps: non-trivial params, batch stats, moments and step count; its
    batch stats are float64 (computed from float64 inputs) while a fresh state's are float32."""
    state = init_adam(jax.random.key(0))
    inputs = jax.random.normal(jax.random.key(1), INPUT_SHAPE)
    batch = jf.Batch(inputs, jnp.array([1, 2]))
    step = jax.jit(train_step)
    for _ in range(3):
        state, _ = step(state, batch)
    params = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(-0.0), state.params)  # a -0.0 must stay -0.0
    return state.replace(params=params), batch


@pytest.fixture(scope="module")
def fresh_target():
    return init_adam(jax.random.key(42))


def extras_for(state):
    return {
        "mask": jax.tree.map(lambda a: a > 0, state.params),
        "curvature": jax.tree.map(lambda a: jnp.square(a.astype(jnp.float64)), state.params),
    }


def test_round_trip_is_bitwise(tmp_path, trained, fresh_target):
    state, _ = trained
    extra = extras_for(state)
    metadata = {"config": {"learning_rate": 0.01, "features": [3, 4]}, "data_seed": 7}
    path = save_checkpoint(tmp_path, state, extra=extra, metadata=metadata)

    restored, restored_extra, restored_metadata = restore_checkpoint(tmp_path, fresh_target)

    assert path == latest_checkpoint(tmp_path) and path.parent == tmp_path
    assert leaf_bits(fresh_target.params) != leaf_bits(state.params)
    for name in ("step", "params", "batch_stats", "opt_state"):
        assert leaf_bits(getattr(restored, name)) == leaf_bits(getattr(state, name)), name
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    assert jax.tree.leaves(restored.batch_stats)[0].dtype == jnp.float64  # the saved dtype, not the target's float32
    assert leaf_bits(restored_extra) == leaf_bits(extra)
    assert {leaf.dtype for leaf in jax.tree.leaves(restored_extra["mask"])} == {np.dtype(bool)}
    assert {name: restored_metadata[name] for name in metadata} == metadata
    assert restored_metadata["opt_state_restored"] is True
    assert restored_metadata["format"] == checkpoint.CHECKPOINT_FORMAT
    versions = restored_metadata["versions"]
    assert {"jaxforget", "jax", "flax", "optax", "orbax-checkpoint", "python"} <= versions.keys()
    assert versions["jax"] == jax.__version__


def test_extra_target_gives_structure_and_array_type(tmp_path, trained, fresh_target):
    state, _ = trained
    extra = extras_for(state)
    save_checkpoint(tmp_path, state, extra=extra)
    extra_target = jax.tree.map(jnp.zeros_like, extra)

    _, restored_extra, _ = restore_checkpoint(tmp_path, fresh_target, extra_target=extra_target)

    assert leaf_bits(restored_extra) == leaf_bits(extra)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored_extra))
    wrong = {"mask": extra["mask"], "curvature": {"Dense_0": extra["curvature"]["Dense_0"]}}
    with pytest.raises(
        ValueError, match=r"^extra_target .*curvature/Conv_0/bias is in the checkpoint but not in extra_target"
    ):
        restore_checkpoint(tmp_path, fresh_target, extra_target=wrong)


def test_restore_into_an_abstract_target(tmp_path, trained):
    state, _ = trained
    save_checkpoint(tmp_path, state, extra={"pair": (np.arange(3), np.array([True]))})

    restored, extra, metadata = restore_checkpoint(tmp_path, abstract_state(MODEL, optax.adam(1e-2)))

    assert metadata["opt_state_restored"] is True
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))
    assert leaf_bits((restored.step, restored.params, restored.batch_stats, restored.opt_state)) == leaf_bits(
        (state.step, state.params, state.batch_stats, state.opt_state)
    )
    assert isinstance(extra["pair"], list)  # orbax stores tuples as lists
    assert leaf_bits(extra) == leaf_bits({"pair": [np.arange(3), np.array([True])]})


def test_model_without_batch_norm_or_optimizer_state(tmp_path):
    init = init_fn(jf.MLP(hidden=(4,)), optax.sgd(0.1))
    state = init(jax.random.key(0))
    save_checkpoint(tmp_path, state)

    restored, _, metadata = restore_checkpoint(tmp_path, init(jax.random.key(1)))

    assert restored.batch_stats is None and metadata["opt_state_restored"] is True
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    assert leaf_bits(restored.params) == leaf_bits(state.params)


def test_saved_dtypes_are_kept_over_the_targets(tmp_path, fresh_target):
    params = jax.tree.map(lambda a: a.astype(jnp.float64) / 3, fresh_target.params)
    state = fresh_target.replace(params=params, opt_state=fresh_target.tx.init(params), step=jnp.asarray(5))
    save_checkpoint(tmp_path, state)

    restored, extra, metadata = restore_checkpoint(tmp_path, fresh_target)

    assert extra is None
    assert leaf_bits(restored.params) == leaf_bits(params)
    assert leaf_bits(restored.opt_state) == leaf_bits(state.opt_state)
    assert metadata["opt_state_restored"] is True


def test_restore_under_another_optimizer_reinitializes_opt_state(tmp_path, trained, fresh_target):
    state, batch = trained
    save_checkpoint(tmp_path, state)
    sgd = optax.sgd(0.1, momentum=0.9)
    target = jf.with_optimizer(fresh_target, sgd)

    restored, _, metadata = restore_checkpoint(tmp_path, target)

    assert metadata["opt_state_restored"] is False
    assert restored.tx is sgd
    assert leaf_bits(restored.params) == leaf_bits(state.params)
    assert leaf_bits(restored.batch_stats) == leaf_bits(state.batch_stats)
    assert leaf_bits(restored.step) == leaf_bits(state.step)
    assert leaf_bits(restored.opt_state) == leaf_bits(sgd.init(state.params))
    stepped, metrics = jax.jit(train_step)(restored, batch)
    assert int(stepped.step) == int(state.step) + 1 and np.isfinite(float(metrics["loss"]))
    assert any(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(stepped.opt_state))


@pytest.mark.parametrize(
    ("model", "path"),
    [
        (
            jf.CNN(features=(3, 5), hidden=8, use_batch_norm=True),
            r"params/Conv_1/bias has shape \(4,\) in the checkpoint but \(5,\)",
        ),
        (jf.CNN(features=(3, 4), hidden=8, use_batch_norm=False), r"batch_stats/BatchNorm_0/mean is in the checkpoint"),
    ],
    ids=["wider", "no-batch-norm"],
)
def test_mismatched_target_is_a_clear_error(tmp_path, trained, model, path):
    state, _ = trained
    save_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match=rf"^target does not match .*{path}.*create_train_state"):
        restore_checkpoint(tmp_path, abstract_state(model, optax.adam(1e-2)))


@pytest.mark.parametrize("crash_at", ["orbax-write", "pointer"])
def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, trained, fresh_target, crash_at):
    state, _ = trained
    good = save_checkpoint(tmp_path, state, extra=extras_for(state), metadata={"run": "A"})

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        if crash_at == "orbax-write":  # the model and optimizer items are being written when the metadata one fails
            patch.setattr(ocp.JsonCheckpointHandler, "async_save", crash)
        else:  # the new checkpoint is complete on disk, but LATEST still names the old one
            patch.setattr(checkpoint, "write_text_atomic", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_checkpoint(tmp_path, state.replace(step=state.step + 100), metadata={"run": "B"})
    leftovers = {p.name for p in tmp_path.iterdir()} - {"LATEST", good.name}
    assert leftovers and all(name.startswith("ckpt_") for name in leftovers)

    restored, extra, metadata = restore_checkpoint(tmp_path, fresh_target)
    assert latest_checkpoint(tmp_path) == good and metadata["run"] == "A"
    assert leaf_bits((restored.step, restored.params, restored.batch_stats, restored.opt_state)) == leaf_bits(
        (state.step, state.params, state.batch_stats, state.opt_state)
    )
    assert leaf_bits(extra) == leaf_bits(extras_for(state))

    newest = save_checkpoint(tmp_path, state.replace(step=state.step + 200), metadata={"run": "C"})
    assert {p.name for p in tmp_path.iterdir()} == {"LATEST", newest.name}
    restored, extra, metadata = restore_checkpoint(tmp_path, fresh_target)
    assert metadata["run"] == "C" and int(restored.step) == int(state.step) + 200 and extra is None


def test_saving_again_keeps_only_the_newest(tmp_path, trained, fresh_target):
    state, _ = trained
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    first = save_checkpoint(tmp_path, state, metadata={"run": 1})
    second = save_checkpoint(tmp_path, state.replace(step=state.step + 1), metadata={"run": 2})

    assert first != second and not first.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["LATEST", second.name, "notes.txt"])
    assert (tmp_path / "LATEST").read_text().strip() == second.name
    restored, _, metadata = restore_checkpoint(tmp_path, fresh_target)
    assert metadata["run"] == 2 and int(restored.step) == int(state.step) + 1


def test_relative_directories_work(tmp_path, monkeypatch, trained, fresh_target):
    state, _ = trained
    monkeypatch.chdir(tmp_path)
    save_checkpoint("runs/model", state)
    restored, _, _ = restore_checkpoint("runs/model", fresh_target)
    assert leaf_bits(restored.params) == leaf_bits(state.params)


def test_missing_checkpoint_names_the_directory(tmp_path, fresh_target):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        restore_checkpoint(missing, fresh_target)
    assert latest_checkpoint(missing) is None
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}: it has no LATEST"):
        restore_checkpoint(tmp_path, fresh_target)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra": [np.zeros(3, bool)]}, "extra must be a dict"),
        ({"extra": {"mask": {"w": "not an array"}}}, r"extra\['mask'\]\['w'\] is a str"),
        ({"metadata": {"seed": np.arange(2)}}, "metadata must be JSON-serializable"),
        ({"metadata": {"versions": "mine"}}, r"metadata keys \['versions'\] are reserved"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, fresh_target, kwargs, message):
    directory = tmp_path / "checkpoints"
    with pytest.raises(ValueError, match=message):
        save_checkpoint(directory, fresh_target, **kwargs)
    assert not directory.exists()
