"""Curvature estimators against exact references (dense float64 Hessians on small models)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build, dense_hessian, ravel

import jaxforget as jf
from jaxforget import curvature

# ---------------------------------------------------------------------------------------------------------------
# Exact identities.


def test_hvp_equals_dense_hessian_times_v(small_tanh_mlp):
    params, batch, _, loss_fn = small_tanh_mlp
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])
    expected = dense_hessian(loss_fn, params, batch) @ ravel(v)
    got = ravel(jax.jit(jf.hvp, static_argnums=0)(loss_fn, params, batch, v))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_exact_diagonal_equals_dense_hessian_diagonal(small_tanh_mlp):
    params, batch, _, loss_fn = small_tanh_mlp
    expected = np.diag(dense_hessian(loss_fn, params, batch))
    got = ravel(jax.jit(lambda p, b: jf.exact_diagonal(loss_fn, p, b, basis_batch_size=16))(params, batch))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def _separable_loss(params, batch):
    """A loss whose Hessian is diagonal: sum of batch-weighted quartics and quadratics per entry."""
    return jnp.mean(batch) * (jnp.sum(params["a"] ** 4) + jnp.sum(3.0 * params["b"] ** 2))


def test_hutchinson_is_exact_for_a_diagonal_hessian_with_one_probe():
    params = {"a": jnp.linspace(-1.0, 2.0, 7), "b": jnp.ones((2, 3))}
    batch = jnp.array([1.0, 2.0, 3.0])
    got = jf.hutchinson_diagonal(_separable_loss, params, batch, jax.random.key(0), num_probes=1)
    expected = {"a": 2.0 * 12 * params["a"] ** 2, "b": 2.0 * 6 * jnp.ones((2, 3))}
    np.testing.assert_allclose(ravel(got), ravel(expected), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Hutchinson statistics.


def _relative_error(estimate, exact):
    return np.linalg.norm(ravel(estimate) - exact) / np.linalg.norm(exact)


def test_hutchinson_error_falls_like_inverse_sqrt_probes(small_tanh_mlp):
    params, batch, _, loss_fn = small_tanh_mlp
    exact = np.diag(dense_hessian(loss_fn, params, batch))
    estimate = jax.jit(jf.hutchinson_diagonal, static_argnums=0, static_argnames="num_probes")
    errors = {
        k: np.mean(
            [
                _relative_error(estimate(loss_fn, params, batch, jax.random.key(s), num_probes=k), exact)
                for s in range(4)
            ]
        )
        for k in (4, 64, 1024)
    }
    # 16x the probes should cut the error by about 4x; allow 2.5x to 6.5x at these fixed seeds.
    assert 2.5 < errors[4] / errors[64] < 6.5, errors
    assert 2.5 < errors[64] / errors[1024] < 6.5, errors


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("probe_batch_size", [1, 3, 7, 100])
def test_hutchinson_chunking_does_not_change_the_estimate(small_tanh_mlp, distribution, probe_batch_size):
    params, batch, _, loss_fn = small_tanh_mlp
    estimate = jax.jit(
        lambda p, b, k, chunk: jf.hutchinson_diagonal(
            loss_fn, p, b, k, num_probes=10, probe_batch_size=chunk, distribution=distribution
        ),
        static_argnums=3,
    )
    # Threefry (JAX's default) draws the same numbers under vmap as one at a time; "rbg" does not.
    full = estimate(params, batch, jax.random.key(3, impl="threefry2x32"), None)
    chunked = estimate(params, batch, jax.random.key(3, impl="threefry2x32"), probe_batch_size)
    other_key = estimate(params, batch, jax.random.key(4, impl="threefry2x32"), None)
    np.testing.assert_allclose(ravel(chunked), ravel(full), rtol=1e-12, atol=1e-14)
    assert not np.allclose(ravel(other_key), ravel(full))


def test_gaussian_probes_are_unbiased_and_add_twice_the_squared_diagonal_to_the_variance(small_tanh_mlp):
    """Per entry, a Rademacher sample v_i (Hv)_i has variance sum_{j != i} H_ij^2; a Gaussian one adds 2 H_ii^2."""
    params, batch, _, loss_fn = small_tanh_mlp
    exact = np.diag(dense_hessian(loss_fn, params, batch))
    num_probes = 4096
    variance = {}
    for distribution in ("rademacher", "gaussian"):
        mean, stderr = jax.jit(
            lambda p, b, k, d=distribution: jf.hutchinson_diagonal_with_stderr(
                loss_fn, p, b, k, num_probes=num_probes, probe_batch_size=1024, distribution=d
            )
        )(params, batch, jax.random.key(0))
        assert _relative_error(mean, exact) < 0.1
        variance[distribution] = ravel(stderr) ** 2 * num_probes
    added = np.sum(variance["gaussian"] - variance["rademacher"])
    np.testing.assert_allclose(added, 2 * np.sum(exact**2), rtol=0.2)


def test_hutchinson_stderr_matches_the_mean_and_covers_the_truth(small_tanh_mlp):
    params, batch, _, loss_fn = small_tanh_mlp
    exact = np.diag(dense_hessian(loss_fn, params, batch))
    key = jax.random.key(5, impl="threefry2x32")
    mean, stderr = jax.jit(
        lambda p, b, k: jf.hutchinson_diagonal_with_stderr(loss_fn, p, b, k, num_probes=200, probe_batch_size=64)
    )(params, batch, key)
    plain = jax.jit(lambda p, b, k: jf.hutchinson_diagonal(loss_fn, p, b, k, num_probes=200))(params, batch, key)
    np.testing.assert_allclose(ravel(mean), ravel(plain), rtol=1e-12, atol=1e-14)
    z = np.abs(ravel(mean) - exact) / np.maximum(ravel(stderr), 1e-300)
    assert np.mean(z < 3.0) > 0.95  # about 99.7% for a normal mean
    assert np.mean(z < 0.5) < 0.6  # the stderr is not inflated (about 38% for a normal mean)


# ---------------------------------------------------------------------------------------------------------------
# Gauss-Newton diagonals.


@pytest.mark.parametrize("method", ["layerwise", "naive"])
def test_ggn_equals_hessian_diagonal_on_relu_cnn_with_batch_norm(small_relu_cnn, method):
    params, batch, logits_fn, loss_fn = small_relu_cnn
    exact = np.diag(dense_hessian(loss_fn, params, batch))
    got = jax.jit(lambda p, x: jf.ggn_diagonal(logits_fn, p, x, method=method, example_batch_size=4))(
        params, batch.inputs
    )
    np.testing.assert_allclose(ravel(got), exact, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def small_resnet():
    """A two-stage ResNet (width 2): eval-mode batch norm with perturbed running statistics, an identity and a
    projection shortcut, global average pooling. Returns (params, batch, logits_fn, loss_fn, dense Hessian).

    Seed 3: with width 2, ReLUs are easily dead everywhere (at seed 0, two of the three examples give constant logits
    and 315 of the 436 Hessian entries are zero); at seed 3 every example is live and every batch-norm entry is not.
    """
    params, batch, logits_fn, loss_fn = build(jf.ResNet18(width=2, stage_sizes=(1, 1)), (3, 6, 6, 3), seed=3)
    return params, batch, logits_fn, loss_fn, dense_hessian(loss_fn, params, batch)


@pytest.fixture
def layerwise_only(monkeypatch):
    """Makes the naive Gauss-Newton path raise and records each trace of the layerwise one, so that a test sees which
    path method='auto' took. Both are private to jaxforget.curvature.ggn; if either is renamed, setattr fails."""
    traced = []
    layerwise = curvature.ggn._layerwise_sum_of_squares

    def naive(*args, **kwargs):
        raise AssertionError("the Gauss-Newton estimator fell back to the naive per-example path")

    def recorded(*args, **kwargs):
        traced.append(True)
        return layerwise(*args, **kwargs)

    monkeypatch.setattr(curvature.ggn, "_naive_sum_of_squares", naive)
    monkeypatch.setattr(curvature.ggn, "_layerwise_sum_of_squares", recorded)
    return traced


def _batch_norm_entries(params) -> tuple[np.ndarray, list[str]]:
    """A boolean mask over the raveled params selecting the scale and bias entries of every nn.BatchNorm, and the
    paths of those leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [[str(getattr(k, "key", k)) for k in path] for path, _ in leaves]
    is_norm = [n[-1] in ("scale", "bias") and n[-2].startswith("BatchNorm_") for n in names]
    mask = np.concatenate([np.full(leaf.size, norm) for norm, (_, leaf) in zip(is_norm, leaves, strict=True)])
    return mask, ["/".join(n) for n, norm in zip(names, is_norm, strict=True) if norm]


def _dense_ggn_diagonal(logits_fn, params, inputs) -> np.ndarray:
    """diag of (1/B) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n from the dense Jacobian of the logits (small models)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = np.asarray(jax.jit(jax.jacrev(lambda f, x: logits_fn(unravel(f), x)))(flat, inputs))  # [B, C, P]
    probs = np.asarray(jax.jit(lambda p, x: jax.nn.softmax(logits_fn(p, x)))(params, inputs))  # [B, C]
    logit_hessians = np.stack([np.diag(p) - np.outer(p, p) for p in probs])  # [B, C, C]
    return np.einsum("nci,ncd,ndi->i", jac, logit_hessians, jac) / len(probs)


def test_ggn_on_a_residual_network_is_layerwise_and_equals_the_hessian_and_the_dense_ggn(small_resnet, layerwise_only):
    """ReLU, eval-mode batch norm, residual additions and average pooling make the logits linear in each single
    parameter, so with cross-entropy the Hessian diagonal is the GGN diagonal; 'auto' must get it the layerwise way."""
    params, batch, logits_fn, _, hessian = small_resnet
    exact = np.diag(hessian)
    assert np.count_nonzero(exact) > 0.75 * exact.size  # mostly live units, so the comparison is not of zeros
    got = ravel(jax.jit(lambda p, x: jf.ggn_diagonal(logits_fn, p, x))(params, batch.inputs))
    assert layerwise_only
    atol = 1e-10 * np.max(np.abs(exact))
    np.testing.assert_allclose(got, exact, rtol=1e-8, atol=atol)
    np.testing.assert_allclose(got, _dense_ggn_diagonal(logits_fn, params, batch.inputs), rtol=1e-8, atol=atol)


def test_ggn_batch_norm_entries_on_a_residual_network_equal_the_hessian(small_resnet, layerwise_only):
    """Checked on their own, at their own scale: batch-norm entries are a small part of the whole diagonal."""
    params, batch, logits_fn, _, hessian = small_resnet
    exact = np.diag(hessian)
    is_norm, norm_leaves = _batch_norm_entries(params)
    assert len(norm_leaves) == 12, norm_leaves  # scale and bias of 6 BatchNorms: stem, 2 per block, projection
    assert np.all(exact[is_norm] != 0)
    got = ravel(jax.jit(lambda p, x: jf.ggn_diagonal(logits_fn, p, x, method="auto"))(params, batch.inputs))
    assert layerwise_only
    np.testing.assert_allclose(got[is_norm], exact[is_norm], rtol=1e-8, atol=1e-10 * np.max(np.abs(exact[is_norm])))


def test_gnb_on_a_residual_network_is_layerwise_and_converges_like_inverse_sqrt_samples(small_resnet, layerwise_only):
    params, batch, logits_fn, _, hessian = small_resnet
    exact = np.diag(hessian)
    gnb = jax.jit(lambda p, x, k, n: jf.gnb_diagonal(logits_fn, p, x, k, num_samples=n), static_argnums=3)
    errors = {
        n: np.mean([_relative_error(gnb(params, batch.inputs, jax.random.key(s), n), exact) for s in range(4)])
        for n in (16, 256, 4096)
    }
    assert layerwise_only
    # 16x the samples should cut the error by about 4x (about 4.9x at these seeds); more than 8x would mean it is not
    # a Monte Carlo error at all.
    assert 2.5 < errors[16] / errors[256] < 8, errors
    assert 2.5 < errors[256] / errors[4096] < 8, errors
    assert errors[4096] < 0.05, errors


def test_hutchinson_on_a_residual_network_is_unbiased_within_its_stderr(small_resnet):
    """Rademacher samples v_i (H v)_i have mean H_ii and covariance C_ik = H_ik^2 (i != k), C_ii = sum_{j != i} H_ij^2;
    so the estimate's error and its stderr are known exactly from the dense Hessian, and both shrink as 1/sqrt(K)."""
    params, batch, _, loss_fn, hessian = small_resnet
    exact = np.diag(hessian)
    covariance = hessian**2
    np.fill_diagonal(covariance, 0.0)
    np.fill_diagonal(covariance, covariance.sum(1))
    variance = np.diag(covariance)
    num_probes = 4096
    mean, stderr = jax.jit(lambda p, b, k: jf.hutchinson_diagonal_with_stderr(loss_fn, p, b, k, num_probes=num_probes))(
        params, batch, jax.random.key(0)
    )
    mean, stderr = ravel(mean), ravel(stderr)
    random = variance > 1e-12 * np.max(variance)
    assert np.count_nonzero(random) > 0.75 * random.size
    # Where a row of H has no off-diagonal entries every probe gives H_ii exactly.
    np.testing.assert_allclose(mean[~random], exact[~random], rtol=0, atol=1e-12 * np.max(np.abs(exact)))
    # The stderr estimates the true standard deviation over sqrt(num_probes) (summed over entries, to within 10%)...
    np.testing.assert_allclose(np.sum(stderr**2) * num_probes, np.sum(variance), rtol=0.1)
    z = np.abs(mean - exact)[random] / stderr[random]
    assert np.mean(z < 4.0) > 0.95  # ...the estimate lies within 4 stderr of the truth (a normal mean: 99.99%)...
    assert np.mean(z < 0.5) < 0.6  # ...and the stderr is not inflated (a normal mean: 38% within 0.5).
    # Per entry the noise hides a scale bias (most rows are dominated by off-diagonal terms); along the exact diagonal
    # it shows: the error there is N(0, d^T C d / K), about 1% of |d|^2 at this K, so a 5% bias would fail.
    projected_error = exact @ (mean - exact) / np.sqrt(exact @ covariance @ exact / num_probes)
    assert abs(projected_error) < 4.0, projected_error


def test_ggn_differs_from_hessian_diagonal_on_tanh_network(small_tanh_mlp):
    """tanh is curved in its input, so the Hessian adds sum_c dloss/dz_c * d2 z_c/dtheta2 to the GGN; a ReLU network's
    second derivative of its logits is zero almost everywhere, so there the two coincide. The GGN itself is still
    exact: it matches J^T (diag(p) - p p^T) J built from the dense Jacobian."""
    params, batch, logits_fn, loss_fn = small_tanh_mlp
    hessian = np.diag(dense_hessian(loss_fn, params, batch))
    got = ravel(jf.ggn_diagonal(logits_fn, params, batch.inputs))
    assert np.max(np.abs(got - hessian)) > 1e-3 * np.max(np.abs(hessian))

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = np.asarray(jax.jacobian(lambda f: logits_fn(unravel(f), batch.inputs))(flat))  # [B, C, P]
    probs = np.asarray(jax.nn.softmax(logits_fn(params, batch.inputs)))
    ggn = sum(j.T @ (np.diag(p) - np.outer(p, p)) @ j for j, p in zip(jac, probs, strict=True)) / len(probs)
    np.testing.assert_allclose(got, np.diag(ggn), rtol=0, atol=1e-12)


class _AwkwardConvs(nn.Module):
    """Strides, dilation, explicit and asymmetric padding, a bias-free conv, and a Dense shared over positions."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(3, (3, 2), strides=(2, 1), padding="VALID")(x))
        x = nn.relu(nn.Conv(4, (2, 2), kernel_dilation=(2, 1), padding=((1, 0), (2, 1)))(x))
        x = nn.Conv(2, (3, 3), padding=1, use_bias=False)(x)
        x = nn.Dense(3)(x)
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_layerwise_matches_naive_on_awkward_convolutions():
    params, batch, logits_fn, _ = build(_AwkwardConvs(), (3, 9, 7, 2))
    ggn = jax.jit(lambda p, x, method: jf.ggn_diagonal(logits_fn, p, x, method=method), static_argnums=2)
    naive = ravel(ggn(params, batch.inputs, "naive"))
    layerwise = ravel(ggn(params, batch.inputs, "layerwise"))
    np.testing.assert_allclose(layerwise, naive, rtol=0, atol=1e-12)
    assert np.count_nonzero(naive) > 0.5 * naive.size


class _WithEmbedding(nn.Module):
    @nn.compact
    def __call__(self, tokens, train=False):
        return nn.Dense(4)(nn.Embed(7, 3)(tokens).reshape(tokens.shape[0], -1))


def test_auto_falls_back_to_naive_where_layers_are_not_covered():
    model = _WithEmbedding()
    tokens = jnp.array([[1, 2], [3, 6], [0, 5]])
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), tokens)["params"])
    logits_fn = lambda p, x: model.apply({"params": p}, x)
    auto = ravel(jf.ggn_diagonal(logits_fn, params, tokens))
    naive = ravel(jf.ggn_diagonal(logits_fn, params, tokens, method="naive"))
    np.testing.assert_array_equal(auto, naive)
    with pytest.raises(ValueError, match="Embed_0/embedding"):
        jf.ggn_diagonal(logits_fn, params, tokens, method="layerwise")


def test_the_layerwise_guard_catches_a_fallback_to_naive(layerwise_only):
    """The guard is not vacuous: a model with an Embed, which the layerwise path does not cover, trips it."""
    model = _WithEmbedding()
    tokens = jnp.array([[1, 2], [3, 6], [0, 5]])
    params = model.init(jax.random.key(0), tokens)["params"]
    with pytest.raises(AssertionError, match="fell back to the naive"):
        jf.ggn_diagonal(lambda p, x: model.apply({"params": p}, x), params, tokens)
    assert not layerwise_only


def test_layerwise_refuses_parameters_that_logits_fn_transforms(small_relu_cnn):
    """Closed forms give gradients with respect to what the layer sees; if logits_fn rescales params first, those
    are not gradients with respect to params, so the layer is not covered and 'auto' computes it the naive way."""
    params, batch, logits_fn, loss_fn = small_relu_cnn
    scaled = lambda p, x: logits_fn(jax.tree.map(lambda a: 2.0 * a, p), x)
    with pytest.raises(ValueError, match="not covered"):
        jf.ggn_diagonal(scaled, params, batch.inputs, method="layerwise")
    scaled_loss = lambda p, b: loss_fn(jax.tree.map(lambda a: 2.0 * a, p), b)
    exact = np.diag(dense_hessian(scaled_loss, params, batch))
    got = jax.jit(lambda p, x: jf.ggn_diagonal(scaled, p, x))(params, batch.inputs)
    np.testing.assert_allclose(ravel(got), exact, rtol=0, atol=1e-12)


def test_gnb_approaches_ggn_as_samples_grow(small_relu_cnn):
    params, batch, logits_fn, _ = small_relu_cnn
    ggn = ravel(jax.jit(lambda p, x: jf.ggn_diagonal(logits_fn, p, x))(params, batch.inputs))
    gnb = jax.jit(lambda p, x, k, n: jf.gnb_diagonal(logits_fn, p, x, k, num_samples=n), static_argnums=3)
    errors = [
        np.linalg.norm(ravel(gnb(params, batch.inputs, jax.random.key(1), n)) - ggn) / np.linalg.norm(ggn)
        for n in (16, 4096)
    ]
    assert errors[1] < 0.05
    assert errors[1] < errors[0] / 4


def test_gnb_does_not_depend_on_chunking_or_method(small_relu_cnn):
    params, batch, logits_fn, _ = small_relu_cnn
    key = jax.random.key(2, impl="threefry2x32")
    gnb = jax.jit(
        lambda p, x, k, method, chunk: jf.gnb_diagonal(
            logits_fn, p, x, k, num_samples=3, method=method, example_batch_size=chunk
        ),
        static_argnums=(3, 4),
    )
    reference = ravel(gnb(params, batch.inputs, key, "naive", None))
    for chunk in (None, 4):
        got = ravel(gnb(params, batch.inputs, key, "auto", chunk))
        np.testing.assert_allclose(got, reference, rtol=1e-10, atol=1e-14)
    assert np.all(reference >= 0)


# ---------------------------------------------------------------------------------------------------------------
# First-order saliencies and streaming.


def test_fisher_matches_a_per_example_loop(small_relu_cnn):
    params, batch, _, loss_fn = small_relu_cnn
    expected = np.zeros_like(ravel(params))
    grad = jax.jit(jax.grad(loss_fn))
    for i in range(len(batch.labels)):
        one = jf.Batch(batch.inputs[i : i + 1], batch.labels[i : i + 1])
        expected += ravel(grad(params, one)) ** 2 / len(batch.labels)
    fisher = jax.jit(lambda p, b, chunk: jf.fisher_diagonal(loss_fn, p, b, example_batch_size=chunk), static_argnums=2)
    for chunk in (None, 4):
        got = ravel(fisher(params, batch, chunk))
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)


def test_gradient_saliency_is_absolute_gradient(small_relu_cnn):
    params, batch, _, loss_fn = small_relu_cnn
    expected = np.abs(ravel(jax.grad(loss_fn)(params, batch)))
    np.testing.assert_array_equal(ravel(jf.gradient_saliency(loss_fn, params, batch)), expected)


def _halves(batch):
    return [jax.tree.map(lambda a: a[:3], batch), jax.tree.map(lambda a: a[3:], batch)]


def test_accumulate_over_two_halves_equals_the_whole_batch(small_relu_cnn):
    params, batch, logits_fn, loss_fn = small_relu_cnn
    key = jax.random.key(0)
    estimators = {
        "ggn": jax.jit(lambda b, k: jf.ggn_diagonal(logits_fn, params, b.inputs)),
        "fisher": jax.jit(lambda b, k: jf.fisher_diagonal(loss_fn, params, b)),
        "exact": jax.jit(lambda b, k: jf.exact_diagonal(loss_fn, params, b, basis_batch_size=256)),
    }
    for name, estimator in estimators.items():
        whole = ravel(estimator(batch, key))
        streamed = ravel(jf.accumulate_diagonal(estimator, iter(_halves(batch)), key))
        np.testing.assert_allclose(streamed, whole, rtol=1e-10, atol=1e-15, err_msg=name)


def test_accumulate_weights_batches_by_their_size(small_relu_cnn):
    params, batch, logits_fn, _ = small_relu_cnn
    estimator = jax.jit(lambda b, k: jf.ggn_diagonal(logits_fn, params, b.inputs))
    uneven = [jax.tree.map(lambda a: a[:1], batch), jax.tree.map(lambda a: a[1:], batch)]
    np.testing.assert_allclose(
        ravel(jf.accumulate_diagonal(estimator, uneven, jax.random.key(0))), ravel(estimator(batch, None)), rtol=1e-10
    )


def test_accumulate_gives_each_batch_its_own_key(small_relu_cnn):
    params, batch, _, loss_fn = small_relu_cnn
    seen = []

    def estimator(b, k):
        seen.append(jax.random.key_data(k).tolist())
        return jax.tree.map(lambda a: a * 0 + jnp.sum(b.labels), params)

    jf.accumulate_diagonal(estimator, _halves(batch), jax.random.key(0))
    assert len(seen) == 2 and seen[0] != seen[1]


# ---------------------------------------------------------------------------------------------------------------
# Flax models with batch norm, jit, and bad input.


def test_every_estimator_jits_on_a_batch_norm_model(small_relu_cnn):
    params, batch, logits_fn, loss_fn = small_relu_cnn
    key = jax.random.key(0)
    calls = {
        "hutchinson": lambda p, b, k: jf.hutchinson_diagonal(loss_fn, p, b, k, num_probes=4, probe_batch_size=2),
        "exact": lambda p, b, k: jf.exact_diagonal(loss_fn, p, b),
        "ggn": lambda p, b, k: jf.ggn_diagonal(logits_fn, p, b.inputs),
        "gnb": lambda p, b, k: jf.gnb_diagonal(logits_fn, p, b.inputs, k),
        "fisher": lambda p, b, k: jf.fisher_diagonal(loss_fn, p, b),
        "saliency": lambda p, b, k: jf.gradient_saliency(loss_fn, p, b),
    }
    for name, call in calls.items():
        out = jax.jit(call)(params, batch, key)
        assert jax.tree.structure(out) == jax.tree.structure(params), name
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out)), name


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_probes_must_be_a_positive_integer(small_tanh_mlp, bad):
    params, batch, _, loss_fn = small_tanh_mlp
    with pytest.raises(ValueError, match="num_probes"):
        jf.hutchinson_diagonal(loss_fn, params, batch, jax.random.key(0), num_probes=bad)


def test_stderr_needs_two_probes(small_tanh_mlp):
    params, batch, _, loss_fn = small_tanh_mlp
    with pytest.raises(ValueError, match="num_probes"):
        jf.hutchinson_diagonal_with_stderr(loss_fn, params, batch, jax.random.key(0), num_probes=1)


def test_bad_knobs_are_named(small_relu_cnn):
    params, batch, logits_fn, loss_fn = small_relu_cnn
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="probe_batch_size"):
        jf.hutchinson_diagonal(loss_fn, params, batch, key, num_probes=2, probe_batch_size=0)
    with pytest.raises(ValueError, match="distribution"):
        jf.hutchinson_diagonal(loss_fn, params, batch, key, num_probes=2, distribution="uniform")
    with pytest.raises(ValueError, match="example_batch_size"):
        jf.ggn_diagonal(logits_fn, params, batch.inputs, example_batch_size=0)
    with pytest.raises(ValueError, match="method"):
        jf.ggn_diagonal(logits_fn, params, batch.inputs, method="fast")
    with pytest.raises(ValueError, match="num_samples"):
        jf.gnb_diagonal(logits_fn, params, batch.inputs, key, num_samples=0)
    with pytest.raises(ValueError, match="batches is empty"):
        jf.accumulate_diagonal(lambda b, k: b, [], key)


def test_v_must_match_params(small_tanh_mlp):
    params, batch, _, loss_fn = small_tanh_mlp
    with pytest.raises(ValueError, match="v must have the same tree structure"):
        jf.hvp(loss_fn, params, batch, {"only": jnp.ones(3)})
    wrong_shape = jax.tree.map(lambda a: jnp.ones(a.shape + (1,)), params)
    with pytest.raises(ValueError, match=r"v leaf .* has shape"):
        jf.hvp(loss_fn, params, batch, wrong_shape)


def test_loss_must_be_scalar(small_tanh_mlp):
    params, batch, logits_fn, _ = small_tanh_mlp
    per_example = lambda p, b: logits_fn(p, b.inputs)[:, 0]
    for call in (
        lambda: jf.hutchinson_diagonal(per_example, params, batch, jax.random.key(0), num_probes=1),
        lambda: jf.exact_diagonal(per_example, params, batch),
        lambda: jf.fisher_diagonal(per_example, params, batch),
        lambda: jf.gradient_saliency(per_example, params, batch),
    ):
        with pytest.raises(ValueError, match="loss_fn must return a scalar"):
            call()


def test_logits_must_be_batch_by_classes(small_tanh_mlp):
    params, batch, logits_fn, _ = small_tanh_mlp
    flat = lambda p, x: logits_fn(p, x).reshape(-1)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        jf.ggn_diagonal(flat, params, batch.inputs)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        jf.gnb_diagonal(flat, params, batch.inputs, jax.random.key(0))
