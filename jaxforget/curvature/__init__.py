"""Diagonal curvature estimators and saliencies, each a pure function returning a pytree shaped like ``params``.

Conventions:

- ``loss_fn(params, batch) -> scalar`` is a *mean* over the batch; ``batch`` is any pytree whose leaves share a
  leading example axis (e.g. :class:`jaxforget.models.Batch`).
- ``logits_fn(params, inputs) -> [B, C]``, or ``[B, T, V]`` (any number of middle axes) for sequence models; the
  GGN estimators assume the softmax cross-entropy averaged over every prediction (all B * T tokens of a sequence
  batch, ``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``), so they estimate the Hessian
  of that same mean loss.
- Nothing here jits: wrap calls in ``jax.jit`` and pass arrays as arguments (``num_probes``, ``probe_batch_size``,
  ``example_batch_size``, ``num_samples``, ``method`` and ``distribution`` are static). Flax models with batch norm
  must run in eval mode (running averages); see :mod:`jaxforget.models`.
- Chunking knobs (``probe_batch_size``, ``example_batch_size``, ``basis_batch_size``) bound memory; for the same key
  they change only the order of floating-point summation, not what is summed. (This holds for JAX's default
  threefry keys; the "rbg" implementations draw different numbers under vmap than one key at a time.)
  Chunks run in a ``lax.scan``. On XLA's CPU backend, convolution gradients inside a loop body run far slower than
  outside one (measured on 2 cores: a conv weight gradient 22x, an input gradient 3.5x), so on CPU chunk only when
  memory requires it; on GPU the loop costs little.
- NNX models: pass ``params`` as the ``nnx.State`` of their ``nnx.Param`` s and a ``logits_fn`` that merges them
  back (see :mod:`jaxforget.nnx_adapter`); every estimator returns a state shaped like it.

Layout (a clean downward flow): ``_base`` (types, input checks, chunked sums, probes) <- ``layers`` (one
closed-form rule per layer type, in a registry keyed by type) <- ``_intercept`` (routing linen and NNX layer calls
through a tape) <- ``ggn`` (the Gauss-Newton driver: factors, naive and layerwise paths, method choice) <-
``estimators`` (every public estimator). This package re-exports the public names.
"""

# The submodules, for tests and benchmarks that reach into them; and the input checks other modules share (the
# redundant aliases mark them as re-exported).
from jaxforget.curvature import estimators as estimators
from jaxforget.curvature import ggn as ggn
from jaxforget.curvature import layers as layers
from jaxforget.curvature._base import _check_choice as _check_choice
from jaxforget.curvature._base import _check_positive as _check_positive
from jaxforget.curvature._base import check_tree_matches as check_tree_matches
from jaxforget.curvature.estimators import (
    accumulate_diagonal,
    exact_diagonal,
    fisher_diagonal,
    ggn_diagonal,
    ggn_vector_product,
    gnb_diagonal,
    gradient_saliency,
    hutchinson_diagonal,
    hutchinson_diagonal_with_stderr,
    hutchinson_residual_diagonal,
    hvp,
)

__all__ = [
    "hvp",
    "hutchinson_diagonal",
    "hutchinson_diagonal_with_stderr",
    "exact_diagonal",
    "ggn_diagonal",
    "gnb_diagonal",
    "ggn_vector_product",
    "hutchinson_residual_diagonal",
    "fisher_diagonal",
    "gradient_saliency",
    "accumulate_diagonal",
]
