"""Masked optax transformations: frozen entries never move, bit for bit, and their optimizer state stays at init."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import jaxforget as jf
from jaxforget.masking import (
    FreezeState,
    MaskedUpdatesState,
    freeze_unselected,
    leaf_mask,
    masked_updates,
    with_optimizer,
)
from jaxforget.selection import select_layers, select_top


def bits(tree) -> list[np.ndarray]:
    """The raw bytes of every leaf, so that equality is bitwise (-0.0 differs from 0.0, NaN equals itself)."""
    return [np.asarray(leaf).view(np.uint8) for leaf in jax.tree.leaves(tree)]


def leaves_of(*trees):
    """The leaves of ``trees`` side by side, as NumPy arrays."""
    return zip(*([np.asarray(x) for x in jax.tree.leaves(tree)] for tree in trees), strict=True)


def assert_bitwise_equal_where(a, b, where):
    for x, y, m in leaves_of(a, b, where):
        np.testing.assert_array_equal(x[m].view(np.uint8), y[m].view(np.uint8))


def assert_all_moved_where(a, b, where):
    for x, y, m in leaves_of(a, b, where):
        assert m.any() and np.all(x[m] != y[m])


def small_problem(seed=0):
    """Float32 params with -0.0 and +0.0 entries, a mask with some of each selected, and gradients that are NaN or
    inf at some frozen entries (they must not leak)."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    params["w"][0, :3] = -0.0
    params["b"][::2] = -0.0
    mask = {"w": rng.random((4, 5)) < 0.4, "b": np.array([True, False, True, False, False])}
    mask["w"][0, :2] = [True, False]
    grads = {key: rng.standard_normal((6, *value.shape)).astype(np.float32) for key, value in params.items()}
    grads["w"][:, ~mask["w"]] = np.where(rng.random((~mask["w"]).sum()) < 0.5, np.nan, np.inf)
    return params, mask, grads


def run_steps(tx, params, grads):
    """``tx`` applied to each of the stacked ``grads`` in turn, in one jitted scan; the state is an argument."""

    def step(carry, g):
        p, s = carry
        updates, s = tx.update(g, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params_out, state), _ = jax.jit(lambda p, s, g: jax.lax.scan(step, (p, s), g))(params, tx.init(params), grads)
    return params_out, state


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.1),
    "adamw": lambda: optax.adamw(0.1, weight_decay=0.5),
    "lion": lambda: optax.lion(0.1, weight_decay=0.5),
    "inject_hyperparams_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.5),
    "rmsprop": lambda: optax.rmsprop(0.1, momentum=0.9),
    "adagrad": lambda: optax.adagrad(0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_entries_and_their_optimizer_state_never_change(name):
    params, mask, grads = small_problem()
    inner = OPTIMIZERS[name]()
    tx = freeze_unselected(inner, mask)
    new_params, state = run_steps(tx, params, grads)
    frozen = jax.tree.map(np.logical_not, mask)
    assert_bitwise_equal_where(new_params, params, frozen)
    assert_all_moved_where(new_params, params, mask)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(new_params))
    # Every parameter-shaped part of the inner state (momentum, moments, accumulators) is at its initial value at
    # the frozen entries, so a mask that grows later starts them fresh.
    assert isinstance(state, FreezeState)
    drop_non_params = dict(transform_non_params=lambda _: None)
    final = optax.tree_utils.tree_map_params(inner, lambda s, m: s[~m], state.inner_state, mask, **drop_non_params)
    initial = optax.tree_utils.tree_map_params(inner, lambda s, m: s[~m], inner.init(params), mask, **drop_non_params)
    assert len(jax.tree.leaves(final)) >= 2  # the parameter-shaped state was found
    for a, b in zip(bits(final), bits(initial), strict=True):
        np.testing.assert_array_equal(a, b)


def test_masked_updates_leave_frozen_entries_bitwise_unchanged():
    params, mask, grads = small_problem()
    grads = jax.tree.map(lambda g: np.nan_to_num(g, nan=1.0, posinf=1.0), grads)  # sgd alone would spread NaN
    tx = optax.chain(optax.sgd(0.1), masked_updates(mask))
    new_params, state = run_steps(tx, params, grads)
    assert_bitwise_equal_where(new_params, params, jax.tree.map(np.logical_not, mask))
    assert_all_moved_where(new_params, params, mask)
    assert isinstance(state[1], MaskedUpdatesState)  # the mask is the whole state: no per-parameter statistics
    assert all(np.array_equal(a, b) for a, b in leaves_of(state[1].mask, mask))


def test_a_positive_zero_update_would_flip_negative_zeros():
    """Why the zero updates are -0.0: -0.0 + 0.0 is +0.0, but -0.0 + -0.0 is -0.0."""
    p = jnp.array([-0.0, 0.0, 1.5])
    assert bits(optax.apply_updates(p, jnp.zeros(3)))[0].tolist() != bits(p)[0].tolist()
    assert bits(optax.apply_updates(p, jnp.full(3, -0.0)))[0].tolist() == bits(p)[0].tolist()


def test_leaf_masks_with_multi_transform_freeze_and_optax_masked_does_not():
    params, _, grads = small_problem()
    grads = jax.tree.map(lambda g: np.nan_to_num(g[:1], nan=1.0, posinf=1.0), grads)
    mask = select_layers(params, "b")
    leaves = leaf_mask(mask)
    assert leaves == {"w": False, "b": True}
    labels = jax.tree.map(lambda train: "train" if train else "freeze", leaves)
    frozen = optax.multi_transform({"train": optax.adam(0.1), "freeze": optax.set_to_zero()}, labels)
    new_params, _ = run_steps(frozen, params, grads)
    np.testing.assert_array_equal(new_params["w"], params["w"])  # equal (here -0.0 turns into 0.0)
    assert np.all(new_params["b"] != params["b"])
    # optax.masked passes the raw gradient through as the update of the unmasked leaves: they move.
    new_params, _ = run_steps(optax.masked(optax.adam(0.1), leaves), params, grads)
    np.testing.assert_allclose(new_params["w"], params["w"] + grads["w"][0])


def test_leaf_mask_rejects_a_partly_selected_leaf():
    with pytest.raises(ValueError, match=r"mask leaf \['w'\] is partly selected.*freeze_unselected"):
        leaf_mask({"w": np.array([True, False]), "b": np.ones(2, bool)})


def test_with_optimizer_swaps_tx_and_starts_fresh_state():
    params, mask, _ = small_problem()
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(0.1))
    state = state.replace(step=7)
    tx = freeze_unselected(optax.sgd(0.1, momentum=0.9), mask)
    swapped = with_optimizer(state, tx)
    assert swapped.tx is tx and swapped.step == 7 and swapped.params is state.params
    assert isinstance(swapped.opt_state, FreezeState)
    assert all(not np.asarray(leaf).any() for leaf in jax.tree.leaves(swapped.opt_state.inner_state))


def test_a_cnn_trained_with_frozen_entries_keeps_them_bitwise():
    """200 AdamW steps with weight decay on the top 10% of |gradient|: every frozen entry is bitwise equal to its
    start, every selected one moved. Biases start at -0.0, which a +0.0 update would flip."""
    model = jf.CNN(features=(4, 8), hidden=16)
    shapes = jax.eval_shape(lambda k: jf.init_model(model, k, (1, 8, 8, 1)), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)

    def start(path, shape):
        if path[-1].key == "bias":
            return np.full(shape.shape, -0.0, np.float32)
        return (rng.standard_normal(shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(start, shapes)
    batch = jf.Batch(rng.standard_normal((32, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, 32))
    loss_fn = jf.loss_fn_for(model)

    @jax.jit
    def unlearn(params, batch):
        grad = lambda p: jax.grad(loss_fn)(p, batch)
        mask = select_top(grad(params), 0.1, magnitude=True)
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
        state = with_optimizer(state, freeze_unselected(optax.adamw(1e-2, weight_decay=0.1), mask))
        state = jax.lax.scan(lambda s, _: (s.apply_gradients(grads=grad(s.params)), None), state, length=200)[0]
        return state, mask

    trained, mask = unlearn(params, batch)
    assert int(trained.step) == 200
    assert_bitwise_equal_where(trained.params, params, jax.tree.map(jnp.logical_not, mask))
    assert sum(np.sum(np.signbit(p[~m]) & (p[~m] == 0)) for p, m in leaves_of(params, mask)) > 0
    assert_all_moved_where(trained.params, params, mask)
    assert float(loss_fn(trained.params, batch)) < float(loss_fn(params, batch))


# ---------------------------------------------------------------------------------------------------------------
# Errors, raised before any compute, naming the argument.


def test_a_non_boolean_mask_is_rejected_when_the_transformation_is_built():
    for factory in (lambda m: freeze_unselected(optax.adam(0.1), m), masked_updates):
        with pytest.raises(ValueError, match=r"mask leaf \['w'\] has dtype float32, but masks must be boolean"):
            factory({"w": np.ones(3, np.float32), "b": np.ones(2, bool)})


@pytest.mark.parametrize(
    "mask, message",
    [
        ({"w": np.ones((4, 5), bool)}, "mask must have the same tree structure as params"),
        ({"w": np.ones((5, 4), bool), "b": np.ones(5, bool)}, r"mask leaf \['w'\] has shape \(5, 4\)"),
    ],
)
def test_a_mask_that_does_not_match_the_params_is_rejected_at_init(mask, message):
    params, _, _ = small_problem()
    for tx in (freeze_unselected(optax.adam(0.1), mask), masked_updates(mask)):
        with pytest.raises(ValueError, match=message):
            tx.init(params)


def test_updates_that_do_not_match_the_mask_are_rejected():
    params, mask, _ = small_problem()
    tx = freeze_unselected(optax.adam(0.1), mask)
    with pytest.raises(ValueError, match="updates must have the same tree structure"):
        tx.update({"w": params["w"]}, tx.init(params), params)
