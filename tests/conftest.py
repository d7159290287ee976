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


# SMALL_RUN with fewer rules: the workdir fault tests rerun it many times.
FAST_RUN = [*SMALL_RUN, "--selections", "hessian-largest,random,all", "--updates", "first-order,diagonal-newton"]


@pytest.fixture(scope="module")
def cli_numerics():
    """The CLI's own numerics in this process (float32, threefry keys), not the float64 and rbg keys this file sets,
    so that in-process runs and subprocess runs of ``jaxforget`` give the same numbers."""
    saved = jax.config.jax_enable_x64, jax.config.jax_default_prng_impl
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    yield
    jax.config.update("jax_enable_x64", saved[0])
    jax.config.update("jax_default_prng_impl", saved[1])


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, cli_numerics):
    """A workdir and results folder of ``jaxforget run`` with FAST_RUN, finished once per module."""
    from jaxforget import cli

    root = tmp_path_factory.mktemp("clean")
    assert cli.main(["run", *FAST_RUN, "--workdir", str(root / "work"), "--out", str(root / "out"), "--quiet"]) == 0
    return root


def results_rows(out) -> list[dict]:
    """The per-seed rows of ``out/results.json`` without the timings (which differ run to run)."""
    import json
    import pathlib

    rows = json.loads((pathlib.Path(out) / "results.json").read_text())["per_seed"][0]
    return [{k: v for k, v in row.items() if k not in ("seconds", "gradient_equivalents")} for row in rows]


def copy_workdir(root, tmp_path):
    """A copy of ``root/work`` (a finished workdir) in ``tmp_path``, to damage."""
    import shutil

    shutil.copytree(root / "work", tmp_path / "work")
    return tmp_path / "work"


def rerun(work, out, *extra: str) -> int:
    """``jaxforget run`` with FAST_RUN (and ``extra``) on ``work``, in this process; its exit status."""
    from jaxforget import cli

    return cli.main(["run", *FAST_RUN, *extra, "--workdir", str(work), "--out", str(out), "--quiet"])
