"""Stacked ensembles: each of K models trained together equals the same seed trained alone; curvature, masks and
updates vmap over the model axis; sharding the model axis over 4 host devices changes no number."""

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxforget as jf
from jaxforget import ensembles as E
from jaxforget import unlearn

# float32 and threefry keys, as the CLI trains: the rbg keys of conftest draw other numbers under vmap.
pytestmark = pytest.mark.usefixtures("cli_numerics")

SEEDS = [0, 1, 5, 6, 7, 9, 12, 20]  # K = 8: two models per device in the sharded test
STEPS, BATCH = 20, 32
MLP = jf.MLP(hidden=(16,), activation="relu")  # the main job's MLP, narrower
BN_CNN = jf.CNN(features=(2,), hidden=8, use_batch_norm=True)  # exercises the stacked batch_stats
INPUT_SHAPE = (1, 8, 8, 1)
ADAM = optax.adam(1e-3)  # the train stage's optimizer

# vmap turns each model's matrix products and convolutions into one batched operation, which XLA's CPU backend may
# sum in another order: measured, the MLP's parameters differ by up to 3e-8 (float32) after 20 Adam steps, never
# bitwise equal. The tolerance is about 30 float32 roundings of the largest entries.
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def digits(cli_numerics):
    full = jf.load("digits", "train")
    return jf.Batch(full.inputs[:300], full.labels[:300])


@functools.cache
def _single_init(model, tx):
    return jax.jit(lambda key: jf.create_train_state(model, key, INPUT_SHAPE, tx))


_single_step = jax.jit(jf.train_step)
_stacked_init = jax.jit(E.create_stacked_states, static_argnums=(0, 2, 3))
_stacked_step = jax.jit(E.indexed_train_step)


def _train_alone(model, data, seed, num_steps=STEPS, tx=ADAM):
    """The single-model path of pipeline's train stage: jitted init at key(seed), batches(seed), fit."""
    state = _single_init(model, tx)(jax.random.key(seed))
    epochs = -(-num_steps // (len(data.labels) // BATCH))
    stream = jf.batches(data, BATCH, seed=seed, epochs=epochs)
    return jf.fit(state, stream, _single_step, num_steps=num_steps, progress=False)


def _train_together(model, data, seeds, num_steps=STEPS, subsets=None, tx=ADAM):
    state = _stacked_init(model, E.keys_for_seeds(seeds), INPUT_SHAPE, tx)
    return state, *E.train_stacked(state, data, BATCH, seeds, _stacked_step, num_steps=num_steps, subsets=subsets)


@pytest.fixture(scope="module")
def trained(digits):
    """K = 8 MLPs trained together: (initial stacked state, trained stacked state, history)."""
    return _train_together(MLP, digits, SEEDS)


def _ggn(params, inputs):
    return jf.ggn_diagonal(jf.logits_fn_for(MLP), params, inputs)


@pytest.fixture(scope="module")
def curvature(digits, trained):
    """The trained models' exact GGN diagonals on 40 shared rows, vmapped: [K, ...] per leaf."""
    return jax.jit(jax.vmap(_ggn, in_axes=(0, None)))(trained[1].params, digits.inputs[:40])


def _top(scores):
    return jf.select_top(scores, 0.1)


@pytest.fixture(scope="module")
def masks(curvature):
    """One mask per model: the top 10% of its curvature."""
    return jax.jit(jax.vmap(_top))(curvature)


# ----------------------------------------------------------------------------------------------------------------
# The data pipeline and the stacked pytrees.


def test_stacked_batches_give_each_model_exactly_its_single_run_batches(digits):
    seeds = [3, 7, 7, 11]
    stacked = list(E.stacked_batches(digits, 64, seeds, epochs=2))
    assert len(stacked) == 2 * (300 // 64)
    for k, seed in enumerate(seeds):
        alone = list(jf.batches(digits, 64, seed=seed, epochs=2))
        assert len(alone) == len(stacked)
        for together, single in zip(stacked, alone, strict=True):
            np.testing.assert_array_equal(together.inputs[k], single.inputs)
            np.testing.assert_array_equal(together.labels[k], single.labels)
    assert not np.array_equal(stacked[0].labels[0], stacked[0].labels[1])  # seeds 3 and 7 differ


def test_subset_batches_are_those_of_each_subset_alone(digits):
    rng = np.random.default_rng(0)
    subsets = [rng.permutation(300)[:200], np.arange(100, 250)]
    for together, *alone in zip(
        E.stacked_batches(digits, 32, [4, 9], subsets=subsets),
        *[
            jf.batches(jf.Batch(digits.inputs[s], digits.labels[s]), 32, seed=seed)
            for s, seed in zip(subsets, [4, 9], strict=True)
        ],
        strict=False,
    ):
        for k, single in enumerate(alone):
            np.testing.assert_array_equal(together.inputs[k], single.inputs)
            np.testing.assert_array_equal(together.labels[k], single.labels)
    # The stream ends with the shortest: 150 rows give 4 batches of 32.
    assert len(list(E.stacked_batch_indices(300, 32, [4, 9], subsets=subsets))) == 4


def test_stack_and_unstack_are_inverse():
    trees = [{"w": jnp.full((2, 3), float(k)), "b": jnp.arange(3) + k} for k in range(4)]
    stacked = E.stack(trees)
    assert E.num_models(stacked) == 4 and stacked["w"].shape == (4, 2, 3)
    for k, tree in enumerate(trees):
        chex.assert_trees_all_equal(E.unstack(stacked, k), tree)
    chex.assert_trees_all_equal(E.unstack(stacked, -1), trees[-1])


def test_keys_for_seeds_are_the_single_run_keys():
    keys = E.keys_for_seeds([0, 7])
    for key, seed in zip(keys, [0, 7], strict=True):
        np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(seed)))


# ----------------------------------------------------------------------------------------------------------------
# Training: each stacked model equals the same seed trained alone.


def test_each_stacked_mlp_equals_the_same_seed_trained_alone(digits, trained):
    initial, state, history = trained
    assert history["loss"].shape == (STEPS, len(SEEDS))
    assert np.all(history["loss"][-1] < history["loss"][0])  # they learned something
    for k, seed in enumerate(SEEDS):
        # Initialization is elementwise given the key: bitwise equal.
        chex.assert_trees_all_equal(E.unstack(initial, k).params, _single_init(MLP, ADAM)(jax.random.key(seed)).params)
        alone, alone_history = _train_alone(MLP, digits, seed)
        together = E.unstack(state, k)
        chex.assert_trees_all_close(together.params, alone.params, **TIGHT)
        chex.assert_trees_all_close(together.opt_state, alone.opt_state, **TIGHT)
        assert int(together.step) == int(alone.step) == STEPS
        np.testing.assert_allclose(history["loss"][:, k], alone_history["loss"], **TIGHT)
    kernels = state.params["Dense_0"]["kernel"]
    assert not np.allclose(kernels[0], kernels[1])  # different models


@pytest.mark.parametrize("unrolled", [False, True])
def test_each_stacked_batch_norm_cnn_equals_the_same_seed_trained_alone(digits, unrolled):
    # SGD, not Adam: a convolution's bias feeding batch norm has a zero gradient in exact arithmetic, and Adam scales
    # its rounding noise (1e-9) up to full-size steps of random sign, so no tolerance would hold for those biases.
    tx = optax.sgd(0.1, momentum=0.9)
    # Stacked single initializations (create_stacked_states' equality is tested above): one compilation fewer.
    state = E.stack([_single_init(BN_CNN, tx)(jax.random.key(seed)) for seed in SEEDS[:2]])
    step = jax.jit(functools.partial(E.indexed_train_step, unrolled=unrolled))
    state, _ = E.train_stacked(state, digits, BATCH, SEEDS[:2], step, num_steps=5)
    assert E.num_models(state.batch_stats) == 2
    for k, seed in enumerate(SEEDS[:2]):
        alone, _ = _train_alone(BN_CNN, digits, seed, num_steps=5, tx=tx)
        together = E.unstack(state, k)
        chex.assert_trees_all_close(together.params, alone.params, **TIGHT)
        chex.assert_trees_all_close(together.batch_stats, alone.batch_stats, **TIGHT)
        assert not np.allclose(together.batch_stats["BatchNorm_0"]["var"], 1.0)  # the statistics were updated


def test_data_subset_ensembles_equal_each_subset_trained_alone(digits):
    # Subsets of different sizes draw different numbers of epochs for the same steps (200 rows: 4, 150 rows: 5).
    rng = np.random.default_rng(1)
    subsets = [rng.choice(300, size, replace=False) for size in (200, 150, 300, 250, 200, 150, 160, 290)]
    _, state, _ = _train_together(MLP, digits, SEEDS, subsets=subsets)
    for k in (0, 1):
        alone, _ = _train_alone(MLP, jf.Batch(digits.inputs[subsets[k]], digits.labels[subsets[k]]), SEEDS[k])
        chex.assert_trees_all_close(E.unstack(state, k).params, alone.params, **TIGHT)


# ----------------------------------------------------------------------------------------------------------------
# Unlearning on stacked models: jax.vmap of the existing functions equals one model at a time.


def _per_model(fn, *stacked, shared=()):
    """``fn(*model_k_args, *shared)`` for each model, stacked."""
    return E.stack([fn(*[E.unstack(t, k) for t in stacked], *shared) for k in range(E.num_models(stacked[0]))])


def test_vmapped_curvature_and_masks_equal_per_model_ones(digits, trained, curvature):
    _, state, _ = trained
    batch = jf.Batch(digits.inputs[:40], digits.labels[:40])
    keys = jax.random.split(jax.random.key(3), len(SEEDS))

    # The exact GGN and a random estimator with one key per model (gnb_diagonal maps alike; left out because each
    # threefry draw costs seconds of CPU compilation).
    def estimators(params, key, batch):  # one program for both: one compilation
        return _ggn(params, batch.inputs), jf.hutchinson_diagonal(jf.loss_fn_for(MLP), params, batch, key, num_probes=4)

    together = jax.jit(jax.vmap(estimators, in_axes=(0, 0, None)))(state.params, keys, batch)
    alone = _per_model(jax.jit(estimators), state.params, keys, shared=(batch,))
    chex.assert_trees_all_close(together, alone, **TIGHT)
    chex.assert_trees_all_close(together[0], curvature, **TIGHT)

    def selections(scores):
        return jf.select_top(scores, 0.05), jf.select_top(scores, 0.02, largest=False, per_layer=True, magnitude=True)

    for scores in (curvature, together[1]):  # the exact GGN, and Hutchinson's signed estimates
        masks = jax.jit(jax.vmap(selections))(scores)
        chex.assert_trees_all_equal(masks, _per_model(jax.jit(selections), scores))  # bitwise
        kernels = masks[0]["Dense_0"]["kernel"]
        assert not np.array_equal(kernels[0], kernels[1])  # one mask per model


def _assert_frozen_outside(new_params, params, masks):
    for new, old, mask in zip(*map(jax.tree.leaves, (new_params, params, masks)), strict=True):
        np.testing.assert_array_equal(np.asarray(new)[~np.asarray(mask)], np.asarray(old)[~np.asarray(mask)])


def test_vmapped_first_order_and_diagonal_newton_updates_equal_per_model_ones(digits, trained, curvature, masks):
    _, state, _ = trained
    old = jf.Batch(digits.inputs[:16], digits.labels[:16])
    new = jf.Batch(digits.inputs[:16], (digits.labels[:16] + 1) % 10)

    def updates(params, mask, curvature, old, new):  # both updates in one program: one compilation
        loss_fn = jf.loss_fn_for(MLP)
        return (
            jf.first_order_update(loss_fn, params, old, new, tau=1e-3, mask=mask),
            jf.diagonal_newton_update(loss_fn, params, old, new, curvature, num_train=300, mask=mask, damping=1e-2),
        )

    together = jax.jit(jax.vmap(updates, in_axes=(0, 0, 0, None, None)))(state.params, masks, curvature, old, new)
    alone = _per_model(jax.jit(updates), state.params, masks, curvature, shared=(old, new))
    chex.assert_trees_all_close(together, alone, **TIGHT)
    for new_params, diagnostics in together:
        assert diagnostics["update_norm"].shape == (len(SEEDS),) and np.all(diagnostics["update_norm"] > 0)
        _assert_frozen_outside(new_params, state.params, masks)


def test_stacked_masked_finetuning_equals_per_model_finetuning(digits, trained, masks):
    _, state, _ = trained
    new = jf.Batch(digits.inputs[:16], (digits.labels[:16] + 1) % 10)
    tx = optax.adam(1e-2)
    stacked = E.with_stacked_optimizer(state, tx, masks)
    step = jax.jit(jax.vmap(unlearn.finetune_step, in_axes=(0, None)))
    for _ in range(3):
        stacked, _ = step(stacked, new)
    single_step = jax.jit(unlearn.finetune_step)
    for k in (0, 1):
        alone = jf.with_optimizer(E.unstack(state, k), jf.freeze_unselected(tx, E.unstack(masks, k)))
        for _ in range(3):
            alone, _ = single_step(alone, new)
        chex.assert_trees_all_close(E.unstack(stacked, k).params, alone.params, **TIGHT)
    _assert_frozen_outside(stacked.params, state.params, masks)
    assert not np.array_equal(stacked.params["Dense_1"]["kernel"], state.params["Dense_1"]["kernel"])
    with pytest.raises(ValueError, match="with_stacked_optimizer"):
        stacked.tx.init(state.params)


# ----------------------------------------------------------------------------------------------------------------
# Sharding: 4 forced host devices give the numbers of one.

# The trained fixture's K = 8 models from the same initial state and data (passed in a file, which spares the
# subprocess the seconds of compiling the threefry initialization), with the model axis over 4 devices: 2 models each.
_SHARDED = textwrap.dedent(
    """
    import sys
    import jax, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec
    import jaxforget as jf
    from jaxforget import ensembles as E

    assert jax.device_count() == 4, jax.devices()
    given = np.load(sys.argv[2])
    data, seeds = jf.Batch(given["inputs"], given["labels"]), given["seeds"].tolist()
    model = jf.MLP(hidden=(16,), activation="relu")
    init = lambda keys: E.create_stacked_states(model, keys, (1, 8, 8, 1), optax.adam(1e-3))
    structure = jax.tree.structure(jax.eval_shape(init, E.keys_for_seeds(seeds)))
    state = jax.tree.unflatten(structure, [given[f"state/{i}"] for i in range(structure.num_leaves)])
    mesh = E.models_mesh()
    step = jax.jit(E.indexed_train_step)
    state, history = E.train_stacked(state, data, 32, seeds, step, num_steps=int(given["steps"]), mesh=mesh)
    ggn = lambda p, x: jf.ggn_diagonal(jf.logits_fn_for(model), p, x)
    curvature = jax.jit(jax.vmap(ggn, in_axes=(0, None)))(state.params, data.inputs[:40])
    masks = jax.jit(jax.vmap(lambda c: jf.select_top(c, 0.1)))(curvature)
    expected = NamedSharding(mesh, PartitionSpec("models"))
    for tree in (state, curvature, masks):
        for leaf in jax.tree.leaves(tree):
            assert leaf.sharding == expected, (leaf.sharding, expected)
            assert len(leaf.sharding.device_set) == 4
    try:
        E.shard_models(jax.tree.map(lambda a: a[:6], state.params), mesh)
    except ValueError as error:
        print("refused:", error)
    trees = {"params": state.params, "curvature": curvature, "masks": masks}
    flat = {f"{name}/{i}": np.asarray(x) for name, tree in trees.items() for i, x in enumerate(jax.tree.leaves(tree))}
    np.savez(sys.argv[1], loss=history["loss"], **flat)
    """
)


def test_sharded_over_four_host_devices_gives_the_numbers_of_one(tmp_path, digits, trained, curvature, masks):
    initial, state, history = trained
    given, out, script = tmp_path / "given.npz", tmp_path / "sharded.npz", tmp_path / "sharded.py"
    leaves = {f"state/{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(initial))}
    np.savez(given, inputs=digits.inputs, labels=digits.labels, seeds=np.asarray(SEEDS), steps=STEPS, **leaves)
    script.write_text(_SHARDED)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), str(out), str(given)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "refused: K=6 models cannot be split evenly over 4 devices" in done.stdout

    sharded = np.load(out)
    np.testing.assert_allclose(sharded["loss"], history["loss"], **TIGHT)
    for name, tree in (("params", state.params), ("curvature", curvature)):
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            np.testing.assert_allclose(sharded[f"{name}/{i}"], leaf, **TIGHT)
    for i, leaf in enumerate(jax.tree.leaves(masks)):
        np.testing.assert_array_equal(sharded[f"masks/{i}"], leaf)


# ----------------------------------------------------------------------------------------------------------------
# Bad arguments: a ValueError naming the argument, before any compute.


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: E.keys_for_seeds([]), "seeds is empty"),
        (lambda: E.keys_for_seeds([0, 1.5]), "seeds must be integers"),
        (lambda: E.stacked_batch_indices(100, 0, [0]), "batch_size=0"),
        (lambda: E.stacked_batch_indices(100, 128, [0]), "batch_size=128 exceeds"),
        (lambda: E.stacked_batch_indices(100, 10, [0], epochs=0), "epochs=0"),
        (lambda: E.stacked_batch_indices(100, 10, [0, 1], epochs=[1]), "epochs has 1 entries"),
        (lambda: E.stacked_batch_indices(100, 10, [0, 1], subsets=[np.arange(20)]), "subsets has 1"),
        (
            lambda: E.stacked_batch_indices(100, 10, [0, 1], subsets=[np.arange(20), np.arange(95, 120)]),
            r"subsets\[1\]",
        ),
        (lambda: E.stacked_batch_indices(100, 10, [0], subsets=[np.ones(20, bool)]), r"subsets\[0\] must be a 1-D"),
        (lambda: E.stacked_batch_indices(100, 30, [0], subsets=[np.arange(20)]), "smallest subset"),
        (lambda: E.stack([]), "trees is empty"),
        (lambda: E.stack([{"a": jnp.ones(2)}, {"b": jnp.ones(2)}]), r"trees\[1\]"),
        (lambda: E.num_models({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}), "different leading sizes"),
        (lambda: E.num_models({"a": jnp.ones(())}), "scalar"),
        (lambda: E.unstack({"a": jnp.ones((2, 3))}, 2), "k=2"),
        (lambda: E.create_stacked_states(MLP, jax.random.key(0), INPUT_SHAPE, optax.sgd(0.1)), "keys must have shape"),
        (lambda: E.create_stacked_states(MLP, np.zeros((2, 2), np.uint32), INPUT_SHAPE, optax.sgd(0.1)), "keys must"),
        (
            lambda: E.shard_models(
                {"a": jnp.ones((2, 3))}, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
            ),
            "mesh_or",
        ),
        (lambda: E.models_mesh([]), "devices is empty"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_train_stacked_checks_its_arguments_before_training(digits, trained):
    initial, _, _ = trained
    step = jax.jit(E.indexed_train_step)
    with pytest.raises(ValueError, match="seeds has 2 entries but state holds K=8"):
        E.train_stacked(initial, digits, BATCH, [0, 1], step, num_steps=5)
    with pytest.raises(ValueError, match="num_steps=0"):
        E.train_stacked(initial, digits, BATCH, SEEDS, step, num_steps=0)
    with pytest.raises(ValueError, match="batch_size=400 exceeds"):
        E.train_stacked(initial, digits, 400, SEEDS, step, num_steps=5)
    masks = jax.tree.map(lambda p: jnp.ones(p.shape[1:], bool), initial.params)  # no model axis
    with pytest.raises(ValueError, match="masks"):
        E.with_stacked_optimizer(initial, optax.sgd(0.1), masks)


@pytest.mark.parametrize("sequential", [False, True])
def test_map_models_maps_the_stacked_arguments_and_shares_the_others(sequential):
    def fn(params, shared, key):
        return params["w"] @ shared + jax.random.normal(key, ())

    stacked = {"w": jnp.arange(12.0).reshape(3, 2, 2)}
    shared = jnp.array([1.0, -1.0])
    keys = jax.random.split(jax.random.key(0), 3)
    mapped = E.map_models(fn, (0, None, 0), sequential=sequential)(stacked, shared, keys)
    expected = np.stack([fn({"w": stacked["w"][k]}, shared, keys[k]) for k in range(3)])
    np.testing.assert_allclose(mapped, expected, rtol=1e-6)


def test_map_models_refuses_axes_other_than_0_and_none():
    with pytest.raises(ValueError, match="in_axes"):
        E.map_models(lambda x: x, (1,))
    with pytest.raises(ValueError, match="at least one 0"):
        E.map_models(lambda x: x, (None,))
