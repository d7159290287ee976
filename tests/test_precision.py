"""Mixed precision: bfloat16 compute with float32 parameters, float32 logits and float32 curvature.

The conftest turns on x64, so the default float here is float64: the checks below say which dtype each array must have
rather than relying on defaults (float32 parameters from Flax's ``param_dtype``, float32 logits from the models' cast).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_jitted, to_float64

import jaxforget as jf

BF16 = jnp.bfloat16
RELATIVE_TOLERANCE = 2e-2  # bfloat16 keeps 8 significant bits (relative spacing 2**-8); a few layers add up

# (name, model constructor, input shape): tiny, to compile in about a second each; cnn_bn covers the CNN without
# batch norm too.
MODELS = [
    ("cnn_bn", lambda **kw: jf.CNN(features=(3, 4), hidden=8, use_batch_norm=True, **kw), (6, 8, 8, 1)),
    ("mlp", lambda **kw: jf.MLP(hidden=(6,), activation="relu", **kw), (6, 4, 4, 1)),
    ("resnet18", lambda **kw: jf.ResNet18(width=4, stage_sizes=(1, 1), **kw), (6, 8, 8, 3)),
]
IDS = [name for name, _, _ in MODELS]
BY_NAME = {name: (make, shape) for name, make, shape in MODELS}


def _inputs(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _labels(shape, seed=2):
    return jax.random.randint(jax.random.key(seed), (shape[0],), 0, 10)


def _relative_error(a, b):
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]) for t in (a, b))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _dtypes(tree):
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}


@pytest.fixture(scope="module", params=MODELS, ids=IDS)
def pair(request):
    """(float32 model, bfloat16 model, variables of each for the same key, input shape)."""
    _, make, shape = request.param
    full, half = make(), make(dtype=BF16)
    return full, half, init_jitted(full, jax.random.key(0), shape), init_jitted(half, jax.random.key(0), shape), shape


def test_parameters_and_statistics_are_float32_and_those_of_the_default_model(pair):
    _, _, full_vars, half_vars, _ = pair
    assert _dtypes(half_vars) == {jnp.dtype(jnp.float32)}  # batch_stats included, where the model has them
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), full_vars, half_vars)
    assert all(jax.tree.leaves(same))


def test_logits_are_float32_and_close_to_the_float32_model(pair):
    full, half, variables, _, shape = pair
    x = _inputs(shape)
    run = lambda m: jax.jit(jf.logits_fn_for(m, variables.get("batch_stats")))(variables["params"], x)
    full_logits, half_logits = run(full), run(half)
    assert half_logits.dtype == jnp.float32
    error = _relative_error(half_logits, full_logits)
    assert 0 < error < RELATIVE_TOLERANCE  # > 0: the compute really is bfloat16


def test_bfloat16_compute_happens_inside_the_model(pair):
    _, half, variables, _, shape = pair
    jaxpr = str(
        jax.make_jaxpr(lambda p, x: half.apply({**variables, "params": p}, x))(variables["params"], _inputs(shape))
    )
    assert "bf16" in jaxpr


def test_train_steps_reduce_the_loss_and_update_float32_batch_statistics():
    make, shape = BY_NAME["resnet18"]
    state = jf.create_train_state(make(dtype=BF16), jax.random.key(0), shape, optax.adam(1e-2))
    batch = jf.Batch(_inputs(shape), _labels(shape))
    step = jax.jit(jf.train_step)
    new_state, first = step(state, batch)
    for _ in range(5):
        new_state, metrics = step(new_state, batch)
    assert float(metrics["loss"]) < 0.8 * float(first["loss"])
    assert _dtypes(new_state.params) == _dtypes(new_state.batch_stats) == {jnp.dtype(jnp.float32)}
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.batch_stats, state.batch_stats)
    assert all(jax.tree.leaves(changed))


def _estimators(model, variables):
    """``fn(params, batch) -> {name: diagonal}``: the estimators of ``model`` in eval mode."""
    stats = variables.get("batch_stats")
    logits_fn, loss_fn = jf.logits_fn_for(model, stats), jf.loss_fn_for(model, stats)
    key = jax.random.key(3)
    return lambda p, b: {
        "ggn_naive": jf.ggn_diagonal(logits_fn, p, b.inputs, method="naive"),
        "hutchinson": jf.hutchinson_diagonal(loss_fn, p, b, key, num_probes=4),
        "fisher": jf.fisher_diagonal(loss_fn, p, b),
    }


def test_curvature_is_float32_and_close_to_float32_compute():
    make, shape = BY_NAME["cnn_bn"]
    variables = init_jitted(make(), jax.random.key(0), shape)
    batch = jf.Batch(_inputs(shape), _labels(shape))
    full = jax.jit(_estimators(make(), variables))(variables["params"], batch)
    half = jax.jit(_estimators(make(dtype=BF16), variables))(variables["params"], batch)
    for estimator in full:
        assert _dtypes(half[estimator]) == {jnp.dtype(jnp.float32)}, estimator
        # Curvature squares the network's Jacobian, so bfloat16's relative error roughly doubles.
        assert 0 < _relative_error(half[estimator], full[estimator]) < 5 * RELATIVE_TOLERANCE, estimator


def test_curvature_takes_the_parameters_dtype_under_x64():
    make, shape = BY_NAME["cnn_bn"]
    model = make(dtype=BF16)
    variables = to_float64(init_jitted(model, jax.random.key(0), shape))
    batch = jf.Batch(_inputs(shape), _labels(shape))
    estimates = jax.eval_shape(_estimators(model, variables), variables["params"], batch)  # dtypes need no compute
    for estimator, diagonal in estimates.items():
        assert _dtypes(diagonal) == {jnp.dtype(jnp.float64)}, estimator


@pytest.mark.parametrize("estimator", ["ggn", "gnb"])
def test_layerwise_gauss_newton_is_float32(estimator):
    make, shape = BY_NAME["cnn_bn"]
    model = make(dtype=BF16)
    variables = init_jitted(model, jax.random.key(0), shape)
    logits_fn = jf.logits_fn_for(model, variables["batch_stats"])
    if estimator == "ggn":
        fn = lambda p, x: jf.ggn_diagonal(logits_fn, p, x, method="layerwise")
    else:
        fn = lambda p, x: jf.gnb_diagonal(logits_fn, p, x, jax.random.key(3), method="layerwise")
    assert _dtypes(jax.eval_shape(fn, variables["params"], _inputs(shape))) == {jnp.dtype(jnp.float32)}


def test_default_dtype_computes_in_the_inputs_dtype():
    """``dtype=None`` adds no cast: float64 inputs and parameters give float64 logits, and an explicit float32
    compute dtype on float32 inputs gives bitwise the default model's logits."""
    make, shape = BY_NAME["cnn_bn"]
    variables = init_jitted(make(), jax.random.key(0), shape)
    x = _inputs(shape)
    run = lambda m, v, x: jax.jit(jf.logits_fn_for(m, v.get("batch_stats")))(v["params"], x)
    assert run(make(), to_float64(variables), to_float64(x)).dtype == jnp.float64
    assert run(make(dtype=jnp.float64), variables, x).dtype == jnp.float64
    np.testing.assert_array_equal(run(make(dtype=jnp.float32), variables, x), run(make(), variables, x))
    assert "bf16" not in str(
        jax.make_jaxpr(lambda p, x: make().apply({**variables, "params": p}, x))(variables["params"], x)
    )


def test_transformer_lm_computes_in_bfloat16_with_float32_logits():
    kw = dict(vocab_size=7, max_length=8, features=8, heads=2, layers=1)
    full, half = jf.TransformerLM(**kw), jf.TransformerLM(**kw, dtype=BF16)
    params = init_jitted(full, jax.random.key(0), (2, 6))["params"]
    same = jax.tree.map(jnp.array_equal, params, init_jitted(half, jax.random.key(0), (2, 6))["params"])
    assert all(jax.tree.leaves(same))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
    full_logits = jax.jit(jf.logits_fn_for(full))(params, tokens)
    half_logits = jax.jit(jf.logits_fn_for(half))(params, tokens)
    assert half_logits.dtype == jnp.float32
    assert 0 < _relative_error(half_logits, full_logits) < RELATIVE_TOLERANCE


def test_logits_fn_for_promotes_a_bfloat16_model_output():
    class Half(jf.MLP):  # a user's model that returns its bfloat16 logits as they are
        def __call__(self, x, *, train=False):
            return super().__call__(x, train=train).astype(BF16)

    params = init_jitted(jf.MLP(hidden=(4,)), jax.random.key(0), (2, 3))["params"]
    logits = jf.logits_fn_for(Half(hidden=(4,)))(params, jnp.ones((2, 3), jnp.float32))
    assert logits.dtype == jnp.float32
