"""Flax NNX models: every estimator on the NNX CNN against the linen CNN on the same weights, the layerwise GGN on
NNX layers against the naive path and the dense GGN, masks over an ``nnx.State``, ``freeze_unselected`` inside
``nnx.Optimizer``, and a short unlearning run end to end."""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxforget as jf
from jaxforget import curvature
from jaxforget.nnx_adapter import nnx_logits_fn, nnx_loss_fn
from jaxforget.nnx_models import NNXCNN, nnx_cnn_from_linen
from jaxforget.selection import check_mask


def _is_variable(x):
    return isinstance(x, nnx.Variable)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def _linen_path(path: tuple) -> tuple[str, str]:
    """An NNXCNN state path (``("convs", 0, "kernel")``) as the linen CNN's (``("Conv_0", "kernel")``)."""
    group, *rest = path
    if group == "convs":
        return f"Conv_{rest[0]}", rest[1]
    if group == "norms":
        return f"BatchNorm_{rest[0]}", rest[1]
    return {"hidden": "Dense_0", "head": "Dense_1"}[group], rest[0]


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)


def to_linen(tree) -> dict:
    """An NNXCNN-shaped tree (an nnx.State with Param leaves, pure, or a plain dict) as the linen CNN's params dict."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        module, name = _linen_path(_keys(path))
        out.setdefault(module, {})[name] = leaf.get_value() if _is_variable(leaf) else leaf
    return out


def from_linen(tree: dict, like):
    """A linen-CNN-shaped dict as a tree shaped like ``like`` (an NNXCNN parameter state)."""
    paths = [_keys(path) for path, _ in jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_variable)[0]]
    leaves = [tree[module][name] for module, name in map(_linen_path, paths)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


# ---------------------------------------------------------------------------------------------------------------
# The NNX CNN against the linen CNN on the same weights (float32).


@pytest.fixture(scope="module")
def twin_cnns():
    """A small linen CNN with batch norm (statistics moved off (0, 1)), its NNX copy, and a float32 batch."""
    linen = jf.CNN(features=(2, 3), hidden=5, use_batch_norm=True)
    variables = jax.jit(lambda k: jf.init_model(linen, k, (1, 8, 8, 1)))(jax.random.key(0))
    stats = jax.tree.map(
        lambda a: a + 0.5 * jnp.abs(jnp.sin(jnp.arange(a.size, dtype=a.dtype))), variables["batch_stats"]
    )
    variables = {"params": variables["params"], "batch_stats": stats}
    model = nnx_cnn_from_linen(linen, variables, input_shape=(8, 8, 1))
    inputs = jax.random.normal(jax.random.key(1), (4, 8, 8, 1), jnp.float32)
    labels = jnp.array([0, 3, 7, 3])
    return linen, variables, model, jf.Batch(inputs, labels)


def _estimators(batch, key):
    """Every estimator as ``f(loss_fn, logits_fn, params, v)``."""
    stream = [jf.Batch(batch.inputs[:2], batch.labels[:2]), jf.Batch(batch.inputs[2:], batch.labels[2:])]
    return {
        "hvp": lambda loss, logits, p, v: jf.hvp(loss, p, batch, v),
        # One chunk of basis directions: a loop over conv HVPs compiles and runs slowly on CPU.
        "exact": lambda loss, logits, p, v: jf.exact_diagonal(loss, p, batch, basis_batch_size=256),
        "ggn": lambda loss, logits, p, v: jf.ggn_diagonal(logits, p, batch.inputs, method="layerwise"),
        "gnb": lambda loss, logits, p, v: jf.gnb_diagonal(logits, p, batch.inputs, key, num_samples=2),
        "fisher": lambda loss, logits, p, v: jf.fisher_diagonal(loss, p, batch),
        "saliency": lambda loss, logits, p, v: jf.gradient_saliency(loss, p, batch),
        "accumulated": lambda loss, logits, p, v: jf.accumulate_diagonal(
            lambda b, k: jf.gradient_saliency(loss, p, b), stream, key
        ),
    }


def test_every_estimator_on_the_nnx_cnn_equals_the_linen_cnn(twin_cnns):
    linen, variables, model, batch = twin_cnns
    logits_fn, params = nnx_logits_fn(model)
    loss_fn, same_params = nnx_loss_fn(model)
    assert jax.tree.structure(same_params) == jax.tree.structure(params)
    linen_params = variables["params"]
    linen_loss = jf.loss_fn_for(linen, variables["batch_stats"])
    linen_logits = jf.logits_fn_for(linen, variables["batch_stats"])
    np.testing.assert_array_equal(logits_fn(params, batch.inputs), linen_logits(linen_params, batch.inputs))

    leaves = jax.tree.leaves(linen_params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    v_linen = jax.tree.unflatten(
        jax.tree.structure(linen_params),
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )
    key = jax.random.key(3)
    for name, estimator in _estimators(batch, key).items():
        got = jax.jit(functools.partial(estimator, loss_fn, logits_fn))(params, from_linen(v_linen, params))
        expected = jax.jit(functools.partial(estimator, linen_loss, linen_logits))(linen_params, v_linen)
        assert jax.tree.structure(got) == jax.tree.structure(params), name
        tight = name in ("ggn", "gnb")  # the same closed forms on the same layer inputs and signals
        np.testing.assert_allclose(
            _flat(to_linen(got)),
            _flat(expected),
            rtol=1e-6 if tight else 2e-5,
            atol=1e-9 if tight else 1e-7,
            err_msg=name,
        )

    # Hutchinson's probes follow the leaf order, so the linen model is evaluated on the NNX state's layout.
    hutchinson = jax.jit(jf.hutchinson_diagonal, static_argnums=0, static_argnames="num_probes")
    got = hutchinson(loss_fn, params, batch, key, num_probes=2)
    expected = hutchinson(lambda p, b: linen_loss(to_linen(p), b), params, batch, key, num_probes=2)
    np.testing.assert_allclose(_flat(got), _flat(expected), rtol=2e-5, atol=1e-7)


def test_models_helpers_dispatch_on_nnx_modules(twin_cnns):
    _, _, model, batch = twin_cnns
    logits_fn, params = nnx_logits_fn(model)
    np.testing.assert_array_equal(jf.logits_fn_for(model)(params, batch.inputs), logits_fn(params, batch.inputs))
    np.testing.assert_array_equal(jf.loss_fn_for(model)(params, batch), nnx_loss_fn(model)[0](params, batch))
    # A pure state (nnx.as_pure) works as well as the Param-wrapped one.
    np.testing.assert_array_equal(logits_fn(nnx.as_pure(params), batch.inputs), logits_fn(params, batch.inputs))
    with pytest.raises(ValueError, match="batch_stats is for linen models"):
        jf.logits_fn_for(model, {"BatchNorm_0": {}})
    with pytest.raises(TypeError, match="must be a flax.nnx.Module.*logits_fn_for"):
        nnx_logits_fn(jf.CNN())
    with pytest.raises(ValueError, match="holds no nnx.Param"):
        nnx_logits_fn(nnx.Dropout(0.5))


def test_the_params_are_a_snapshot_and_the_model_stays_in_training_mode():
    model = NNXCNN(input_shape=(4, 4, 1), features=(2, 2), hidden=3, use_batch_norm=True, rngs=nnx.Rngs(0))
    _, params = nnx_logits_fn(model)
    before = _flat(params)
    model.head.bias.set_value(model.head.bias.get_value() + 1.0)
    np.testing.assert_array_equal(_flat(params), before)
    assert model.norms[0].use_running_average is False


def test_nnx_cnn_from_linen_checks_its_arguments():
    linen = jf.CNN(features=(2, 3), hidden=5)
    variables = jf.init_model(linen, jax.random.key(0), (1, 8, 8, 1))
    with pytest.raises(ValueError, match="input_shape"):
        nnx_cnn_from_linen(linen, variables, input_shape=(12, 12, 1))
    with pytest.raises(ValueError, match="batch_stats"):
        nnx_cnn_from_linen(jf.CNN(features=(2, 3), hidden=5, use_batch_norm=True), variables, input_shape=(8, 8, 1))
    with pytest.raises(TypeError, match="jaxforget.models.CNN"):
        nnx_cnn_from_linen(jf.MLP(), variables)
    with pytest.raises(ValueError, match="divisible by 4"):
        NNXCNN(input_shape=(6, 6, 1), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------------------------
# The layerwise GGN on NNX layers: the naive path and the dense GGN (float64).


@pytest.fixture
def x64():
    """64-bit floats for this test only (tests/conftest.py turns them on for every test already)."""
    saved = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", saved)


class _Mixed(nnx.Module):
    """Conv -> eval-mode batch norm -> ReLU -> a Linear on every position -> ReLU -> flatten -> Linear."""

    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float64, head=None):
        self.conv = nnx.Conv(1, 2, (2, 2), strides=1, padding="VALID", param_dtype=dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(2, use_running_average=True, param_dtype=dtype, rngs=rngs)
        self.mix = nnx.Linear(2, 2, param_dtype=dtype, rngs=rngs)
        self.head = head or nnx.Linear(8, 3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        x = nnx.relu(self.mix(x))  # [B, 2, 2, 2]: a weight shared by 4 positions
        return self.head(x.reshape(x.shape[0], -1))


def _mixed_model(**kwargs):
    model = _Mixed(nnx.Rngs(4), **kwargs)
    model.norm.mean.set_value(jnp.array([0.2, -0.3]))
    model.norm.var.set_value(jnp.array([1.5, 0.7]))
    model.norm.scale.set_value(jnp.array([1.2, 0.8]))
    model.norm.bias.set_value(jnp.array([0.1, 0.05]))
    return model


def _dense_ggn_diagonal(logits_fn, params, inputs) -> np.ndarray:
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    logits = logits_fn(params, inputs)
    jac = jax.jacobian(lambda f: logits_fn(unravel(f), inputs).reshape(-1))(flat)  # [B * C, P]
    probs = jax.nn.softmax(logits, axis=-1)
    blocks = [jnp.diag(p) - jnp.outer(p, p) for p in probs]
    hessian = jax.scipy.linalg.block_diag(*blocks) / logits.shape[0]
    return np.diag(np.asarray(jac.T @ hessian @ jac))


def test_layerwise_ggn_on_nnx_layers_equals_naive_and_the_dense_ggn(x64):
    model = _mixed_model()
    logits_fn, params = nnx_logits_fn(model)
    inputs = jax.random.normal(jax.random.key(5), (5, 3, 3, 1), jnp.float64)
    assert curvature.ggn._resolve_method("auto", logits_fn, params, inputs) == "layerwise"
    ggn = jax.jit(jf.ggn_diagonal, static_argnums=0, static_argnames=("method", "example_batch_size"))
    layerwise = ggn(logits_fn, params, inputs, method="layerwise", example_batch_size=2)
    naive = ggn(logits_fn, params, inputs, method="naive")
    assert jax.tree.structure(layerwise) == jax.tree.structure(params)
    np.testing.assert_allclose(_flat(layerwise), _flat(naive), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(_flat(layerwise), _dense_ggn_diagonal(logits_fn, params, inputs), rtol=1e-10, atol=1e-14)
    assert np.mean(_flat(layerwise) > 0) > 0.9  # nearly every entry live: the comparisons cover them


class _TiedHead(nnx.Module):
    """The same nnx.Linear called twice: its closed form would miss the cross terms."""

    def __init__(self, rngs):
        self.inner = nnx.Linear(8, 8, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(8, 3, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(self.inner(self.inner(x)))


def test_layers_the_layerwise_path_does_not_cover_raise_or_fall_back(x64):
    inputs = jax.random.normal(jax.random.key(6), (3, 3, 3, 1), jnp.float64)
    layer_norm = nnx.Sequential(
        nnx.LayerNorm(8, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
        nnx.Linear(8, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(1)),
    )
    cases = {
        "head/layers/0/bias, head/layers/0/scale": layer_norm,
        "head/inner/bias, head/inner/kernel": _TiedHead(nnx.Rngs(2)),
    }
    for uncovered, head in cases.items():
        logits_fn, params = nnx_logits_fn(_mixed_model(head=head))
        with pytest.raises(ValueError, match=f"not covered: {uncovered}\\. Use method='auto' or 'naive'"):
            jf.ggn_diagonal(logits_fn, params, inputs, method="layerwise")
        assert curvature.ggn._resolve_method("auto", logits_fn, params, inputs) == "naive"
    ggn = jax.jit(jf.ggn_diagonal, static_argnums=0, static_argnames="method")
    np.testing.assert_array_equal(
        _flat(ggn(logits_fn, params, inputs, method="auto")), _flat(ggn(logits_fn, params, inputs, method="naive"))
    )


def test_other_threads_call_nnx_layers_unrouted_while_a_trace_is_taping():
    """The NNX class patch routes calls only on the thread inside the tape; another thread's calls run as usual."""
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    routed_here, results = [], {}
    inside, release = threading.Event(), threading.Event()

    def handler(module, call, args, kwargs):
        routed_here.append(type(module))
        inside.set()
        release.wait(timeout=30)
        return call(*args, **kwargs)

    def other_thread():
        inside.wait(timeout=30)
        results["other"] = layer(jnp.ones((1, 2)))
        release.set()

    own_call = vars(nnx.Linear)["__call__"]
    thread = threading.Thread(target=other_thread)
    thread.start()
    with curvature._intercept.layer_calls(handler):
        results["here"] = layer(jnp.ones((1, 2)))
    thread.join()
    assert routed_here == [nnx.Linear]  # only this thread's call
    np.testing.assert_array_equal(results["other"], results["here"])
    assert vars(nnx.Linear)["__call__"] is own_call  # the patch is gone once no thread is inside


# ---------------------------------------------------------------------------------------------------------------
# Masks over an nnx.State, and freeze_unselected inside nnx.Optimizer.


def test_select_top_over_an_nnx_state_equals_select_top_over_a_dict_of_its_leaves():
    params = nnx.state(_Mixed(nnx.Rngs(0), dtype=jnp.float32), nnx.Param)
    scores = jax.tree.map(lambda a: jnp.sin(a * 7.0), params)  # signed, with no ties
    as_dict = {f"leaf_{i:02d}": leaf for i, leaf in enumerate(jax.tree.leaves(scores))}

    @jax.jit
    def masks(scores, key):  # one compilation for all four
        return [(jf.select_top(s, 0.1, magnitude=True), jf.select_random(s, 0.1, key)) for s in scores]

    (mask, random), (dict_mask, dict_random) = masks([scores, as_dict], jax.random.key(0))
    assert jax.tree.structure(mask) == jax.tree.structure(random) == jax.tree.structure(params)
    np.testing.assert_array_equal(_flat(mask), _flat(dict_mask))
    np.testing.assert_array_equal(_flat(random), _flat(dict_random))
    check_mask(mask, params)
    check_mask(nnx.as_pure(mask), nnx.as_pure(params))
    summary = jf.mask_summary(mask)
    assert list(summary["layers"])[:2] == ["conv/bias", "conv/kernel"]
    assert summary["selected"] == round(0.1 * summary["total"]) == int(_flat(mask).sum())
    assert jf.select_layers(params, "head")["head"]["kernel"].get_value().all()


def _frozen_training(mask, steps=4):
    """AdamW with weight decay through freeze_unselected inside nnx.Optimizer: (start, end) parameter states."""
    model = _mixed_model(dtype=jnp.float32)
    model.norm.use_running_average = False  # batch statistics: the frozen entries stay put regardless
    start = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, jf.freeze_unselected(optax.adamw(1e-2, weight_decay=0.1), mask), wrt=nnx.Param)
    inputs = jax.random.normal(jax.random.key(7), (6, 3, 3, 1), jnp.float32)
    labels = jnp.array([0, 1, 2, 0, 1, 2])

    @nnx.jit
    def step(model, optimizer, inputs, labels):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(inputs), labels).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(steps):
        step(model, optimizer, inputs, labels)
    return start, nnx.state(model, nnx.Param)


def test_freeze_unselected_inside_nnx_optimizer_never_moves_frozen_entries():
    _, params = nnx_logits_fn(_mixed_model(dtype=jnp.float32))
    mask = jf.select_random(params, 0.3, jax.random.key(8))
    for given in (mask, nnx.as_pure(mask)):  # Param-wrapped or pure, as select_top returns for either params
        start, end = _frozen_training(given)
        selected = _flat(mask)
        before, after = _flat(start), _flat(end)
        np.testing.assert_array_equal(before[~selected].view(np.uint32), after[~selected].view(np.uint32))
        assert np.all(before[selected] != after[selected])
    with pytest.raises(ValueError, match="mask must have the same tree structure"):
        nnx.Optimizer(
            _mixed_model(dtype=jnp.float32),
            jf.freeze_unselected(optax.sgd(0.1), {"w": mask["conv"]["kernel"]}),
            wrt=nnx.Param,
        )


# ---------------------------------------------------------------------------------------------------------------
# End to end: train an NNX CNN on embedded digits, select by the exact GGN, unlearn only the selection.


def test_unlearning_an_nnx_cnn_end_to_end_changes_only_the_selected_entries():
    data = jf.embedded_dataset("digits")
    inputs, labels = jnp.asarray(data.inputs[:256], jnp.float32), jnp.asarray(data.labels[:256])
    model = NNXCNN(input_shape=(8, 8, 1), features=(4, 8), hidden=16, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, inputs, labels):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(inputs), labels).mean()  # noqa: E731
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    losses = [
        float(train_step(model, optimizer, inputs[i : i + 64], labels[i : i + 64])) for i in (0, 64, 128, 192) * 3
    ]
    assert losses[-1] < losses[0]

    loss_fn, params = nnx_loss_fn(model)
    logits_fn, _ = nnx_logits_fn(model)
    diagonal = jax.jit(jf.ggn_diagonal, static_argnums=0)(logits_fn, params, inputs[:32])
    mask = jax.jit(jf.select_top, static_argnums=1)(diagonal, 0.01)
    assert jf.mask_summary(mask)["selected"] == round(0.01 * jf.mask_summary(mask)["total"])

    # First-order unlearning of a group relabelled, then masked fine-tuning on the rest.
    group = jf.Batch(inputs[:8], labels[:8])
    relabelled = jf.Batch(inputs[:8], (labels[:8] + 1) % 10)
    unlearn = jax.jit(lambda p, old, new, m: jf.first_order_update(loss_fn, p, old, new, tau=1.0, mask=m)[0])
    updated = unlearn(params, group, relabelled, mask)
    before, after, selected = _flat(params), _flat(updated), _flat(mask)
    np.testing.assert_array_equal(before[~selected], after[~selected])
    assert np.any(before[selected] != after[selected])

    nnx.update(model, updated)
    start = _flat(nnx.state(model, nnx.Param))
    tuner = nnx.Optimizer(model, jf.freeze_unselected(optax.adamw(1e-3, weight_decay=1e-2), mask), wrt=nnx.Param)
    for i in (8, 72):
        train_step(model, tuner, inputs[i : i + 64], labels[i : i + 64])
    end = _flat(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(start[~selected].view(np.uint32), end[~selected].view(np.uint32))
    assert np.any(start[selected] != end[selected])


def test_the_last_layer_of_an_nnx_cnn_is_its_head_as_for_the_linen_cnn(twin_cnns):
    linen, variables, model, batch = twin_cnns
    logits_fn, params = nnx_logits_fn(model)
    order = jf.layers_in_call_order(logits_fn, params, batch.inputs)
    linen_order = jf.layers_in_call_order(
        jf.logits_fn_for(linen, variables["batch_stats"]), variables["params"], batch.inputs
    )
    assert len(order) == len(linen_order) and order[-2:] == ["hidden", "head"]  # call order, not the keys' order
    mask = jf.select_layers(params, jf.last_layer(logits_fn, params, batch.inputs))
    selected = {name: layer["selected"] for name, layer in jf.mask_summary(mask)["layers"].items() if layer["selected"]}
    assert selected == {"head/bias": 10, "head/kernel": 5 * 10}
