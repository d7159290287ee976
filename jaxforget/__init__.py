"""jaxforget: sharpness-aware parameter selection for machine unlearning, in JAX and Flax.

The pipeline is curvature -> mask -> masked optax update; each stage is a small pure function on pytrees.
"""

from jaxforget.curvature import (
    accumulate_diagonal,
    exact_diagonal,
    fisher_diagonal,
    ggn_diagonal,
    gnb_diagonal,
    gradient_saliency,
    hutchinson_diagonal,
    hutchinson_diagonal_with_stderr,
    hvp,
)
from jaxforget.data import EMBEDDED_DATASETS, batches, embedded_dataset, stratified_split
from jaxforget.metrics import relative_error, top_k_recall
from jaxforget.models import CNN, MLP, Batch, ResNet18, init_model, logits_fn_for, loss_fn_for

__version__ = "0.1.0"

__all__ = [
    "hvp",
    "hutchinson_diagonal",
    "hutchinson_diagonal_with_stderr",
    "exact_diagonal",
    "ggn_diagonal",
    "gnb_diagonal",
    "fisher_diagonal",
    "gradient_saliency",
    "accumulate_diagonal",
    "top_k_recall",
    "relative_error",
    "EMBEDDED_DATASETS",
    "embedded_dataset",
    "stratified_split",
    "batches",
    "Batch",
    "CNN",
    "MLP",
    "ResNet18",
    "init_model",
    "logits_fn_for",
    "loss_fn_for",
]
