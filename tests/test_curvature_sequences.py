"""Curvature estimators on sequence outputs: a tiny causal Transformer with [B, T, V] logits and the cross-entropy
averaged over all B * T tokens, against dense float64 references (the Hessian and the GGN over raveled params)."""

import importlib.util
import pathlib
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_hessian, ravel, to_float64

import jaxforget as jf
from jaxforget import curvature
from jaxforget.metrics import relative_error, top_k_recall


def _benchmark_module():
    """benchmarks/curvature_transformer.py, which measures the estimators on this same tiny Transformer."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "curvature_transformer.py"
    spec = importlib.util.spec_from_file_location("curvature_transformer_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Flax's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Its TinyTransformer: token and position embeddings, one pre-LayerNorm block (causal attention, GELU MLP), a final
# Dense, on B = 6 sequences of T = 4 tokens from V = 5.
_BENCHMARK = _benchmark_module()
BATCH, LENGTH, VOCAB = _BENCHMARK.BATCH, _BENCHMARK.LENGTH, _BENCHMARK.VOCAB


class Problem(NamedTuple):
    params: dict
    batch: jf.Batch
    logits_fn: object
    loss_fn: object
    hessian: np.ndarray
    ggn: np.ndarray


def ravel_jax(tree) -> jax.Array:
    """``ravel`` inside jit and vmap."""
    return jax.flatten_util.ravel_pytree(tree)[0]


def dense_ggn(logits_fn, params, inputs) -> np.ndarray:
    """(1/N) sum over the N = B * T tokens of J_t^T (diag(p_t) - p_t p_t^T) J_t, from the dense Jacobian."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = np.asarray(jax.jit(jax.jacfwd(lambda f, x: logits_fn(unravel(f), x)))(flat, inputs))  # [B, T, V, P]
    jac = jac.reshape(-1, jac.shape[-2], flat.size)
    probs = np.asarray(jax.nn.softmax(logits_fn(params, inputs))).reshape(-1, jac.shape[1])
    logit_hessians = np.stack([np.diag(p) - np.outer(p, p) for p in probs])
    return np.einsum("nci,ncd,ndj->ij", jac, logit_hessians, jac) / len(probs)


def _problem(train_steps: int) -> Problem:
    """The Transformer on a learnable next-token rule (label = token + 1 mod V, a fifth of the labels random),
    trained for ``train_steps`` Adam steps on the batch itself (the benchmark's problem), with its dense Hessian and
    GGN."""
    made = _BENCHMARK.make_problem("test", train_steps)
    logits_fn, loss_fn = _BENCHMARK.logits_fn, _BENCHMARK.loss_fn
    hessian = dense_hessian(loss_fn, made.params, made.batch)
    ggn = dense_ggn(logits_fn, made.params, made.batch.inputs)
    return Problem(made.params, made.batch, logits_fn, loss_fn, hessian, ggn)


@pytest.fixture(scope="module")
def trained():
    """Trained to a loss of 0.03 (from 1.75): small residuals p - y, so H - G is small."""
    return _problem(train_steps=100)


@pytest.fixture(scope="module")
def untrained():
    """At initialization: large residuals, so H - G is as large as H itself."""
    return _problem(train_steps=0)


class _SequenceMLP(nn.Module):
    """Dense layers applied per position, a parameter-free causal running sum (so a position's output depends on
    earlier positions through shared weights), and a batch norm: every parameter is layerwise-covered."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6)(x))
        h = nn.BatchNorm(use_running_average=True)(jnp.cumsum(h, axis=1))
        return nn.Dense(VOCAB)(h)


@pytest.fixture(scope="module")
def sequence_mlp():
    model = _SequenceMLP()
    inputs = jax.random.normal(jax.random.key(4), (3, LENGTH, 3), jnp.float64)
    variables = to_float64(jax.jit(model.init)(jax.random.key(5), inputs))
    stats = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
    logits_fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)
    return variables["params"], inputs, logits_fn


# ---------------------------------------------------------------------------------------------------------------
# Exact GGN on sequence logits.


class _AttentionOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(VOCAB)(nn.MultiHeadDotProductAttention(num_heads=1)(x, x, mask=nn.make_causal_mask(x[..., 0])))


def test_auto_takes_the_exact_naive_path_for_a_transformer(trained):
    """Embeddings, layer norm and attention's DenseGeneral have no layerwise rule, so 'auto' must not use it."""
    params, batch, logits_fn = trained.params, trained.batch, trained.logits_fn
    with pytest.raises(ValueError, match="not covered: Embed_0/embedding, Embed_1/embedding, LayerNorm_0"):
        jf.ggn_diagonal(logits_fn, params, batch.inputs, method="layerwise")
    attention = _AttentionOnly()
    inputs = jnp.ones((2, LENGTH, 3))
    attention_params = attention.init(jax.random.key(0), inputs)["params"]
    with pytest.raises(ValueError, match="not covered: MultiHeadDotProductAttention_0/key/bias"):
        jf.ggn_diagonal(lambda p, x: attention.apply({"params": p}, x), attention_params, inputs, method="layerwise")
    estimate = jax.jit(lambda p, x, m: jf.ggn_diagonal(logits_fn, p, x, method=m), static_argnums=2)
    np.testing.assert_array_equal(
        ravel(estimate(params, batch.inputs, "auto")), ravel(estimate(params, batch.inputs, "naive"))
    )


@pytest.mark.parametrize("example_batch_size", [None, 4])
def test_ggn_diagonal_on_sequence_logits_equals_the_dense_ggn(trained, example_batch_size):
    params, batch, logits_fn = trained.params, trained.batch, trained.logits_fn
    got = ravel(
        jax.jit(lambda p, x: jf.ggn_diagonal(logits_fn, p, x, example_batch_size=example_batch_size))(
            params, batch.inputs
        )
    )
    np.testing.assert_allclose(got, np.diag(trained.ggn), rtol=1e-10, atol=1e-12 * np.abs(got).max())


def test_layerwise_on_dense_layers_over_sequences_equals_naive_and_the_dense_ggn(sequence_mlp):
    """Shared weights: a Dense kernel's per-example gradient sums x_t (x) delta_t over positions before squaring."""
    params, inputs, logits_fn = sequence_mlp
    estimate = jax.jit(lambda p, x, m: jf.ggn_diagonal(logits_fn, p, x, method=m), static_argnums=2)
    layerwise = ravel(estimate(params, inputs, "layerwise"))
    naive = ravel(estimate(params, inputs, "naive"))
    expected = np.diag(dense_ggn(logits_fn, params, inputs))
    assert np.count_nonzero(expected) == expected.size
    np.testing.assert_allclose(layerwise, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(naive, expected, rtol=1e-10, atol=1e-14)
    # The same labels drawn for the Monte Carlo estimate give the same squares on both paths.
    gnb = jax.jit(lambda p, x, k, m: jf.gnb_diagonal(logits_fn, p, x, k, num_samples=3, method=m), static_argnums=3)
    key = jax.random.key(6)
    np.testing.assert_allclose(
        ravel(gnb(params, inputs, key, "layerwise")), ravel(gnb(params, inputs, key, "naive")), rtol=1e-10, atol=1e-14
    )


def test_gnb_on_sequence_logits_is_unbiased_for_the_ggn(trained):
    """One label sequence per sample (a label at every position at once) still averages to the exact diagonal."""
    params, batch, logits_fn = trained.params, trained.batch, trained.logits_fn
    num = 2000
    one = lambda k: ravel_jax(jf.gnb_diagonal(logits_fn, params, batch.inputs, k, num_samples=1))
    draws = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), num)))
    exact = np.diag(trained.ggn)
    stderr = draws.std(0, ddof=1) / np.sqrt(num)
    z = (draws.mean(0) - exact) / np.maximum(stderr, 1e-12 * np.abs(exact).max())
    assert np.abs(z).max() < 5.5, np.abs(z).max()
    assert relative_error(draws.mean(0), exact) < 0.1


# ---------------------------------------------------------------------------------------------------------------
# GGN-vector products, the Hessian, and why diag(H) != diag(G) here.


def test_ggn_vector_product_equals_the_dense_ggn_times_v(trained):
    params = trained.params
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.key(8), flat.shape, flat.dtype))
    product = jax.jit(lambda p, x, w: curvature.ggn_vector_product(trained.logits_fn, p, x, w))
    got = ravel(product(params, trained.batch.inputs, v))
    expected = trained.ggn @ ravel(v)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_ggn_vector_product_checks_v(trained):
    with pytest.raises(ValueError, match="v must have the same tree structure"):
        curvature.ggn_vector_product(trained.logits_fn, trained.params, trained.batch.inputs, {"a": jnp.ones(2)})


def test_exact_diagonal_is_the_hessian_and_not_the_ggn_for_a_transformer(trained, untrained):
    """GELU, softmax attention and layer norm are not piecewise linear in the parameters, so the network's own
    curvature (the residual-weighted second derivatives of the logits, H - G) is on the diagonal too."""
    exact = ravel(
        jax.jit(lambda p, b: jf.exact_diagonal(trained.loss_fn, p, b, basis_batch_size=64))(
            trained.params, trained.batch
        )
    )
    hessian = np.diag(trained.hessian)
    np.testing.assert_allclose(exact, hessian, rtol=1e-9, atol=1e-11 * np.abs(hessian).max())
    # Measured: 0.97 at initialization, 0.23 after 100 steps (where the residuals p - y are small).
    for problem in (untrained, trained):
        difference = float(relative_error(np.diag(problem.ggn), np.diag(problem.hessian)))
        assert difference > 0.1, difference


# ---------------------------------------------------------------------------------------------------------------
# Hutchinson on H - G.


def _residual_samples(problem, num, *, ggn, seed=9):
    """``num`` one-probe residual estimates diag(G) + v * (H - G) v, [num, P]."""
    params, batch = problem.params, problem.batch
    one = lambda k: ravel_jax(
        curvature.hutchinson_residual_diagonal(
            problem.loss_fn, problem.logits_fn, params, batch, k, num_probes=1, ggn=ggn
        )
    )
    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), num)))


@pytest.mark.parametrize("point", ["untrained", "trained"])
def test_residual_estimator_is_unbiased_for_the_hessian_diagonal(point, request):
    """Averaged over many probes it approaches diag(H) within its standard error; its probe variance is that of
    Hutchinson on H - G: per entry, sum over j != i of (H - G)_ij^2 for Rademacher probes."""
    problem = request.getfixturevalue(point)
    unravel = jax.flatten_util.ravel_pytree(problem.params)[1]
    ggn = unravel(jnp.asarray(np.diag(problem.ggn)))
    num = 4000
    samples = _residual_samples(problem, num, ggn=ggn)
    exact = np.diag(problem.hessian)
    stderr = samples.std(0, ddof=1) / np.sqrt(num)
    z = (samples.mean(0) - exact) / np.maximum(stderr, 1e-12 * np.abs(exact).max())
    assert np.abs(z).max() < 5.5, np.abs(z).max()
    residual = problem.hessian - problem.ggn
    predicted = (residual**2).sum(1) - np.diag(residual) ** 2
    np.testing.assert_allclose(samples.var(0, ddof=1).sum(), predicted.sum(), rtol=0.1)


def test_residual_estimator_error_falls_like_inverse_sqrt_probes(untrained):
    """With the exact GGN all the error is the probes' on diag(H - G): 16x the probes cut it about 4x."""
    unravel = jax.flatten_util.ravel_pytree(untrained.params)[1]
    ggn = unravel(jnp.asarray(np.diag(untrained.ggn)))
    samples = _residual_samples(untrained, 8 * 64, ggn=ggn, seed=10).reshape(8, 64, -1)
    exact = np.diag(untrained.hessian)
    errors = {k: np.mean([relative_error(s[:k].mean(0), exact) for s in samples]) for k in (4, 64)}
    assert 2.5 < errors[4] / errors[64] < 6.5, errors


def test_residual_estimator_on_class_logits_averages_to_the_ggn_where_the_network_is_piecewise_linear(small_relu_cnn):
    """ReLU, max-pool and eval-mode batch norm, [B, C] logits: diag(H - G) = 0 (the logits are linear in each single
    parameter), so the probes average to diag(G) = diag(H). H - G itself is not zero (the logits are multilinear
    across layers), so each probe adds noise: on such networks ggn_diagonal alone is exact and cheaper."""
    params, batch, logits_fn, loss_fn = small_relu_cnn
    ggn = jax.jit(lambda p, x: jf.ggn_diagonal(logits_fn, p, x))(params, batch.inputs)
    num = 1000
    one = lambda k: ravel_jax(
        curvature.hutchinson_residual_diagonal(loss_fn, logits_fn, params, batch, k, num_probes=1, ggn=ggn)
    )
    samples = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(11), num)))
    expected = ravel(ggn)
    assert np.abs(samples - expected).max() > 1e-3 * np.abs(expected).max()  # the probes are not exact here
    stderr = samples.std(0, ddof=1) / np.sqrt(num)
    z = (samples.mean(0) - expected) / np.maximum(stderr, 1e-12 * np.abs(expected).max())
    assert np.abs(z).max() < 5.5, np.abs(z).max()


def test_residual_estimator_checks_its_arguments(trained):
    params, batch, logits_fn, loss_fn = trained.params, trained.batch, trained.logits_fn, trained.loss_fn
    key = jax.random.key(0)
    as_tuple = lambda p, b: loss_fn(p, jf.Batch(*b))
    with pytest.raises(ValueError, match="inputs"):
        curvature.hutchinson_residual_diagonal(as_tuple, logits_fn, params, tuple(batch), key, num_probes=1)
    with pytest.raises(ValueError, match="ggn must have the same tree structure"):
        curvature.hutchinson_residual_diagonal(loss_fn, logits_fn, params, batch, key, num_probes=1, ggn=[1.0])
    with pytest.raises(ValueError, match="num_probes"):
        curvature.hutchinson_residual_diagonal(loss_fn, logits_fn, params, batch, key, num_probes=0)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        curvature.hutchinson_residual_diagonal(
            loss_fn, lambda p, x: logits_fn(p, x).reshape(-1), params, batch, key, num_probes=1
        )


# ---------------------------------------------------------------------------------------------------------------
# Measurement: plain Hutchinson against the residual estimator at equal cost.
#
# Cost unit: one Hessian-vector product (HVP). A GGN-vector product (a linearized forward pass, its transpose) is
# counted as one HVP, and a gradient or batched vector-Jacobian product as half of one (hvp: "about two gradients").
# So plain Hutchinson with K probes costs K; the residual estimator costs 2 per probe (Hv and Gv) plus its diag(G):
# the exact GGN is T * V batched vector-Jacobian products, T * V / 2 = 10 here; gnb_diagonal with s samples s / 2.

BUDGETS = (20, 40, 80)
REPEATS = 8
GNB_SAMPLES = (4, LENGTH * VOCAB)  # the second costs as much as the exact GGN


def _per_probe(problem):
    """Independent one-probe samples, [REPEATS, probes, P]: Hutchinson's v * Hv, the residual's v * (H - G) v and
    single-sample GNB diagonals; each estimator's repeat r averages the first probes of row r."""
    params, batch, logits_fn, loss_fn = problem[:4]
    zeros = jax.tree.map(jnp.zeros_like, params)
    hutchinson = lambda k: ravel_jax(jf.hutchinson_diagonal(loss_fn, params, batch, k, num_probes=1))
    residual = lambda k: ravel_jax(
        curvature.hutchinson_residual_diagonal(loss_fn, logits_fn, params, batch, k, num_probes=1, ggn=zeros)
    )
    gnb = lambda k: ravel_jax(jf.gnb_diagonal(logits_fn, params, batch.inputs, k, num_samples=1))

    def draw(fn, count, seed):
        keys = jax.random.split(jax.random.key(seed), REPEATS * count)
        return np.asarray(jax.jit(jax.vmap(fn))(keys)).reshape(REPEATS, count, -1)

    return draw(hutchinson, max(BUDGETS), 20), draw(residual, max(BUDGETS) // 2, 21), draw(gnb, max(GNB_SAMPLES), 22)


def _measure(problem) -> dict[str, tuple[float, float]]:
    """Mean relative error and top-10% recall against diag(H) over REPEATS, per estimator and budget."""
    hutchinson, residual, gnb = _per_probe(problem)
    exact_h, exact_g = np.diag(problem.hessian), np.diag(problem.ggn)
    exact_cost = LENGTH * VOCAB / 2

    def score(estimates):
        errors = [float(relative_error(e, exact_h)) for e in estimates]
        recalls = [float(top_k_recall(jnp.asarray(e), jnp.asarray(exact_h), 0.1)) for e in estimates]
        return float(np.mean(errors)), float(np.mean(recalls))

    rows = {f"ggn only (cost {exact_cost:g}, biased)": score([exact_g] * REPEATS)}
    for budget in BUDGETS:
        rows[f"hutchinson, {budget} probes (cost {budget})"] = score(hutchinson[:, :budget].mean(1))
        probes = int((budget - exact_cost) // 2)
        rows[f"residual + exact ggn, {probes} probes (cost {exact_cost + 2 * probes:g})"] = score(
            exact_g + residual[:, :probes].mean(1)
        )
        for samples in GNB_SAMPLES:
            probes = int((budget - samples / 2) // 2)
            rows[f"residual + gnb({samples}), {probes} probes (cost {samples / 2 + 2 * probes:g})"] = score(
                gnb[:, :samples].mean(1) + residual[:, :probes].mean(1)
            )
    return rows


@pytest.mark.parametrize("point", ["untrained", "trained"])
def test_measure_hutchinson_against_the_residual_estimator_at_equal_cost(point, request):
    problem = request.getfixturevalue(point)
    rows = _measure(problem)
    # Shown with pytest -s.
    loss = float(problem.loss_fn(problem.params, problem.batch))
    print(f"\n{point} (loss {loss:.3f}): mean over {REPEATS} keys of the relative error and top-10% recall vs diag(H)")
    for name, (error, recall) in rows.items():
        print(f"  {name:48s} error {error:6.3f}  recall {recall:5.3f}")
    for name, (_, recall) in rows.items():
        assert recall > 0.15, (name, recall)  # a random selection recalls about 0.1
    if point == "trained":
        # Small residuals make H - G small: the residual estimator wins by far at every budget.
        for budget in BUDGETS:
            plain = rows[f"hutchinson, {budget} probes (cost {budget})"][0]
            probes = int((budget - LENGTH * VOCAB / 2) // 2)
            residual = rows[f"residual + exact ggn, {probes} probes (cost {LENGTH * VOCAB / 2 + 2 * probes:g})"][0]
            assert residual < 0.5 * plain, (budget, residual, plain)
