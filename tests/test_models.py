"""The paper's model families."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_jitted

import jaxforget as jf


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_paper_cnn_has_422k_parameters():
    shapes = jax.eval_shape(lambda: jf.init_model(jf.CNN(), jax.random.key(0), (1, 28, 28, 1)))
    assert _count(shapes["params"]) == 421_642
    assert "batch_stats" not in shapes


def test_resnet18_cifar_has_11m_parameters_and_batch_stats():
    shapes = jax.eval_shape(lambda: jf.init_model(jf.ResNet18(), jax.random.key(0), (1, 32, 32, 3)))
    assert _count(shapes["params"]) == 11_173_962
    assert _count(shapes["batch_stats"]) == 2 * 4800  # mean and var for every batch-norm channel


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (jf.CNN(features=(4, 4), hidden=8, use_batch_norm=True), (2, 28, 28, 1)),
        (jf.ResNet18(width=2, stage_sizes=(1, 1, 1, 1)), (2, 16, 16, 3)),
        (jf.MLP(), (2, 8, 8, 1)),
    ],
)
def test_eval_mode_is_pure_and_train_mode_updates_statistics(model, shape):
    variables = init_jitted(model, jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), shape)
    logits = jax.jit(jf.logits_fn_for(model, variables.get("batch_stats")))(variables["params"], x)
    assert logits.shape == (2, 10)
    if "batch_stats" in variables:
        train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
        updates = train(variables, x)
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
        assert all(jax.tree.leaves(changed))


def test_max_pool_2x2_matches_flax_max_pool():
    x = jax.random.normal(jax.random.key(0), (3, 6, 4, 5))
    np.testing.assert_array_equal(jf.models.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    with pytest.raises(ValueError, match="even height and width"):
        jf.models.max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


def test_loss_fn_is_mean_cross_entropy():
    model = jf.MLP()
    params = init_jitted(model, jax.random.key(0), (4, 8, 8, 1))["params"]
    batch = jf.Batch(jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), jnp.array([0, 3, 9, 3]))
    logits = jf.logits_fn_for(model)(params, batch.inputs)
    expected = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), batch.labels])
    np.testing.assert_allclose(jf.loss_fn_for(model)(params, batch), expected, rtol=1e-6)
