"""The library never jits internally, so each public function must give the same result called eagerly and under the
caller's ``jax.jit``: checked with ``chex.variants`` on a tiny MLP, for estimators, selection and updates."""

import chex
import jax
import jax.numpy as jnp
import optax
from absl.testing import parameterized

import jaxforget as jf

_MODEL = jf.MLP(num_classes=3, hidden=(6,))
_INPUTS = jax.random.normal(jax.random.key(0), (10, 4))
_BATCH = jf.Batch(_INPUTS, jnp.arange(10) % 3)
_PARAMS = jf.init_model(_MODEL, jax.random.key(1), (1, 4))["params"]
_LOSS = jf.loss_fn_for(_MODEL)
_LOGITS = jf.logits_fn_for(_MODEL)
_KEY = jax.random.key(2)


def _frozen_step(params):
    """One AdamW step (weight decay on) through freeze_unselected, the positive entries selected."""
    tx = jf.freeze_unselected(optax.adamw(0.1, weight_decay=0.5), jax.tree.map(lambda a: a > 0, params))
    updates, _ = tx.update(params, tx.init(params), params)
    return optax.apply_updates(params, updates)


# name -> fn(params) of arrays only (static settings bound here), so that every variant traces the same program.
_CALLS = {
    "hutchinson": lambda p: jf.hutchinson_diagonal(_LOSS, p, _BATCH, _KEY, num_probes=3),
    "ggn": lambda p: jf.ggn_diagonal(_LOGITS, p, _INPUTS),
    "gnb": lambda p: jf.gnb_diagonal(_LOGITS, p, _INPUTS, _KEY, num_samples=2),
    "fisher": lambda p: jf.fisher_diagonal(_LOSS, p, _BATCH),
    "saliency": lambda p: jf.gradient_saliency(_LOSS, p, _BATCH),
    "select_top": lambda p: jf.select_top(jf.fisher_diagonal(_LOSS, p, _BATCH), 0.2),
    "first_order": lambda p: jf.first_order_update(
        _LOSS, p, _BATCH, _BATCH._replace(labels=(_BATCH.labels + 1) % 3), tau=0.1
    ),
    "freeze": lambda p: _frozen_step(p),
}


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in _CALLS))
    def test_same_result_eagerly_and_under_jit(self, name):
        result = self.variant(_CALLS[name])(_PARAMS)
        reference = jax.jit(_CALLS[name])(_PARAMS)
        chex.assert_trees_all_equal_shapes_and_dtypes(result, reference)
        if name == "select_top":
            chex.assert_trees_all_equal(result, reference)
        else:  # XLA may fuse differently eagerly (op by op) and under jit: equal to rounding
            chex.assert_trees_all_close(result, reference, rtol=1e-6, atol=1e-12)
            chex.assert_tree_all_finite(result)
