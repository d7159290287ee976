"""Checkpoints of states other than jaxforget's TrainState: Flax's own TrainState, subclasses with fields of their
own, plain pytrees and NNX objects, restored bit for bit; and the clear errors on what a checkpoint cannot store."""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, struct
from flax.training import train_state

import jaxforget as jf


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


def _inputs():
    return jax.random.normal(jax.random.key(1), (8, 4))


def _trained(state, steps=3):
    """A few Adam steps, so that the optimizer state holds non-trivial moments."""
    x = _inputs()

    def loss(params):
        return jnp.mean(state.apply_fn({"params": params}, x) ** 2)

    for _ in range(steps):
        state = state.apply_gradients(grads=jax.grad(loss)(state.params))
    return state


def _plain_state(seed, tx=None):
    model = _Net()
    params = model.init(jax.random.key(seed), _inputs())["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx or optax.adam(1e-2))


class _StateWithExtras(train_state.TrainState):
    """A user's subclass: an EMA of the parameters, a dropout key, a counter, and configuration that is no data."""

    ema_params: Any = None
    dropout_key: jax.Array = None
    swaps: jax.Array = None
    label: str = struct.field(pytree_node=False, default="run-a")


def _subclass_state(seed):
    plain = _plain_state(seed)
    return _StateWithExtras.create(
        apply_fn=plain.apply_fn,
        params=plain.params,
        tx=plain.tx,
        ema_params=jax.tree.map(lambda p: p * 0.5, plain.params),
        dropout_key=jax.random.key(seed + 10),
        swaps=jnp.asarray(seed, jnp.int32),
    )


def _data(state):
    """A dataclass state's data fields (its tx and apply_fn are the target's objects, not restored ones)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.metadata.get("pytree_node", True)}


def _raw(tree):
    """Typed keys as their raw data, so that trees of keys compare with chex."""

    def raw(leaf):
        is_key = jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key)
        return jax.random.key_data(leaf) if is_key else leaf

    return jax.tree.map(raw, tree)


@pytest.mark.parametrize("make", [_plain_state, _subclass_state], ids=["flax-trainstate", "subclass-with-fields"])
def test_flax_train_states_round_trip_bitwise(tmp_path, make):
    state = _trained(make(0))
    jf.save_checkpoint(tmp_path, state, extra={"mask": jax.tree.map(lambda p: p > 0, state.params)})
    target = make(7)  # another seed: the values must come from disk
    restored, extra, metadata = jf.restore_checkpoint(tmp_path, target)

    assert type(restored) is type(state) and metadata["opt_state_restored"]
    chex.assert_trees_all_equal(_raw(_data(restored)), _raw(_data(state)), strict=True)  # dtypes, values: all fields
    assert restored.tx is target.tx and restored.apply_fn == target.apply_fn  # code: the target's
    np.testing.assert_array_equal(extra["mask"]["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"] > 0)
    # Training goes on from the restored state exactly as from the saved one.
    chex.assert_trees_all_equal(_trained(restored, 1).params, _trained(state, 1).params)


def test_jaxforget_train_state_round_trips_bitwise(tmp_path):
    model = jf.CNN()
    state = jf.create_train_state(model, jax.random.key(0), (1, 28, 28, 1), optax.adamw(1e-3))
    state = state.replace(step=jnp.asarray(5), params=jax.tree.map(lambda p: p + 0.25, state.params))
    jf.save_checkpoint(tmp_path, state)
    restored, _, metadata = jf.restore_checkpoint(
        tmp_path, jf.create_train_state(model, jax.random.key(3), (1, 28, 28, 1), optax.adamw(1e-3))
    )
    assert metadata["opt_state_restored"]
    chex.assert_trees_all_equal(_data(restored), _data(state), strict=True)


def test_another_optimizer_gets_a_fresh_state_and_plain_sgd_saves_none(tmp_path):
    state = _trained(_plain_state(0))
    jf.save_checkpoint(tmp_path / "adam", state)
    restored, _, metadata = jf.restore_checkpoint(tmp_path / "adam", _plain_state(1, optax.sgd(0.1, momentum=0.9)))
    assert not metadata["opt_state_restored"]
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, optax.sgd(0.1, momentum=0.9).init(state.params))

    # Plain SGD's state has no array: it is stored as nothing, and restores as the target's empty one.
    sgd = _trained(_plain_state(0, optax.sgd(0.1)))
    jf.save_checkpoint(tmp_path / "sgd", sgd)
    restored, _, metadata = jf.restore_checkpoint(tmp_path / "sgd", _plain_state(2, optax.sgd(0.1)))
    assert metadata["opt_state_restored"]
    chex.assert_trees_all_equal(restored.params, sgd.params)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


def _nnx_pair(seed):
    model = _NnxNet(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)


def _nnx_step(model, optimizer):
    x = jax.random.normal(jax.random.key(2), (4, 6))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)


def test_nnx_model_and_optimizer_round_trip_bitwise(tmp_path):
    model, optimizer = _nnx_pair(0)
    for _ in range(2):
        _nnx_step(model, optimizer)  # moves parameters, batch statistics, moments and the dropout key
    jf.save_checkpoint(tmp_path, (model, optimizer))
    (restored_model, restored_optimizer), _, _ = jf.restore_checkpoint(tmp_path, _nnx_pair(5))

    chex.assert_trees_all_equal(_raw(nnx.state(restored_model)), _raw(nnx.state(model)), strict=True)
    chex.assert_trees_all_equal(_raw(nnx.state(restored_optimizer)), _raw(nnx.state(optimizer)), strict=True)
    _nnx_step(model, optimizer)
    _nnx_step(restored_model, restored_optimizer)
    chex.assert_trees_all_equal(_raw(nnx.state(restored_model)), _raw(nnx.state(model)))


def test_plain_pytrees_round_trip(tmp_path):
    state = {"weights": [jnp.arange(6.0).reshape(2, 3), jnp.ones(2, jnp.bfloat16)], "step": jnp.asarray(3, jnp.int8)}
    jf.save_checkpoint(tmp_path, state)
    restored, _, _ = jf.restore_checkpoint(tmp_path, jax.eval_shape(lambda: state))
    chex.assert_trees_all_equal(restored, state, strict=True)


def test_what_a_checkpoint_cannot_store_is_refused_before_anything_is_written(tmp_path):
    class _Labelled(train_state.TrainState):
        label: str = "a string in a data field"

    plain = _plain_state(0)
    bad = _Labelled.create(apply_fn=plain.apply_fn, params=plain.params, tx=plain.tx)
    with pytest.raises(ValueError, match=r"state\.label is a str.*pytree_node=False"):
        jf.save_checkpoint(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="holds no arrays"):
        jf.save_checkpoint(tmp_path / "empty", {"nothing": {}})
    with pytest.raises(ValueError, match="two leaves named"):
        jf.save_checkpoint(tmp_path / "clash", {"a": {"0": jnp.ones(1)}, "b": jnp.ones(1)} | {"a/0": jnp.ones(1)})


def test_the_wrong_kind_of_target_is_a_clear_error(tmp_path):
    jf.save_checkpoint(tmp_path, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="target does not match the checkpoint"):
        jf.restore_checkpoint(tmp_path, _plain_state(0))
    with pytest.raises(ValueError, match="w has shape"):
        jf.restore_checkpoint(tmp_path, {"w": jnp.ones(4)})
