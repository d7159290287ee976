"""Shared fixtures. Tests compare against exact references, so they run in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxforget as jf

jax.config.update("jax_enable_x64", True)
# XLA's CPU compiler takes about a second per threefry hash, and Flax initialization hashes once per parameter
# (30 s for a tiny ResNet); the RngBitGenerator-based implementation compiles in a fraction of that.
jax.config.update("jax_default_prng_impl", "rbg")


# A main-job configuration that runs end to end in seconds: digits, a group of 20, 30 training steps.
SMALL_RUN = [
    "--dataset", "digits", "--group-size", "20", "--train-steps", "30", "--batch-size", "32",
    "--validation-size", "200", "--holdout-size", "200", "--probes", "1", "--finetune-steps", "3",
    "--relearn-steps", "2", "--timing-repeats", "1",
]  # fmt: skip


def to_float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def ravel(tree) -> np.ndarray:
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def dense_hessian(loss_fn, params, batch) -> np.ndarray:
    """The full Hessian of loss_fn at params over the raveled parameters (small models only)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda f, b: loss_fn(unravel(f), b)))(flat, batch))


def init_jitted(model, key, input_shape):
    """``jf.init_model`` under jit: eager initialization dispatches op by op and takes tens of seconds."""
    return jax.jit(lambda k: jf.init_model(model, k, input_shape))(key)


def build(model, input_shape, *, seed=0, perturb_stats=True):
    """Float64 variables for ``model``, random inputs and labels, and its eval-mode logits_fn and loss_fn.

    Batch-norm running statistics are moved away from (0, 1) so that eval-mode normalization is not the identity.
    """
    variables = to_float64(init_jitted(model, jax.random.key(seed), input_shape))
    stats = variables.get("batch_stats")
    if stats is not None and perturb_stats:
        keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(stats))))
        stats = jax.tree.map(lambda a: a + 0.5 * jax.random.uniform(next(keys), a.shape, a.dtype), stats)
    inputs = jax.random.normal(jax.random.key(seed + 2), input_shape, jnp.float64)
    labels = jax.random.randint(jax.random.key(seed + 3), (input_shape[0],), 0, 10)
    return (
        variables["params"],
        jf.Batch(inputs, labels),
        jf.logits_fn_for(model, stats),
        jf.loss_fn_for(model, stats),
    )


@pytest.fixture(scope="session")
def small_relu_cnn():
    """A small ReLU CNN with eval-mode batch norm and max-pool: piecewise linear in its parameters."""
    return build(jf.CNN(features=(3, 4), hidden=8, use_batch_norm=True), (6, 8, 8, 1))


@pytest.fixture(scope="session")
def small_tanh_mlp():
    return build(jf.MLP(hidden=(6,), activation="tanh"), (5, 4, 4, 1))
