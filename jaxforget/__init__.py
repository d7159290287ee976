"""jaxforget: sharpness-aware parameter selection for machine unlearning, in JAX and Flax.

The pipeline is curvature (jaxforget.curvature) -> mask (jaxforget.selection) -> masked optax update
(jaxforget.masking); each stage is a small pure function on pytrees.
"""

from jaxforget.atomic import CorruptFileError
from jaxforget.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint, verify_checkpoint
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
from jaxforget.data import EMBEDDED_DATASETS, TFDS_DATASETS, batches, embedded_dataset, load, stratified_split
from jaxforget.masking import (
    FreezeState,
    MaskedUpdatesState,
    freeze_unselected,
    frozen_update,
    leaf_mask,
    masked_updates,
    with_optimizer,
)
from jaxforget.metrics import (
    RelearningResult,
    accuracy,
    accuracy_restored,
    attack_success_rate,
    fidelity,
    membership_inference_auc,
    relative_error,
    relearning_steps,
    top_k_recall,
)
from jaxforget.models import CNN, MLP, Batch, ResNet18, init_model, logits_fn_for, loss_fn_for
from jaxforget.scenarios import Scenario, backdoor, label_flip, poison_like, stamp_trigger, triggered_test_set
from jaxforget.selection import (
    last_layer,
    last_layers_holding,
    layers_in_call_order,
    mask_summary,
    select_layers,
    select_random,
    select_top,
)
from jaxforget.train import TrainState, create_train_state, eval_step, evaluate, fit, predict_logits, train_step
from jaxforget.unlearn import (
    diagonal_newton_update,
    finetune_step,
    finetune_unlearn,
    first_order_update,
    gradient_difference,
    second_order_update,
    stack_batches,
)

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
    "select_top",
    "select_random",
    "select_layers",
    "last_layer",
    "layers_in_call_order",
    "last_layers_holding",
    "mask_summary",
    "masked_updates",
    "freeze_unselected",
    "leaf_mask",
    "with_optimizer",
    "MaskedUpdatesState",
    "FreezeState",
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
    "TrainState",
    "create_train_state",
    "train_step",
    "eval_step",
    "fit",
    "evaluate",
    "predict_logits",
    "gradient_difference",
    "first_order_update",
    "second_order_update",
    "diagonal_newton_update",
    "stack_batches",
    "finetune_step",
    "finetune_unlearn",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "verify_checkpoint",
    "CorruptFileError",
    "frozen_update",
    "load",
    "TFDS_DATASETS",
    "Scenario",
    "label_flip",
    "backdoor",
    "stamp_trigger",
    "triggered_test_set",
    "poison_like",
    "accuracy",
    "accuracy_restored",
    "attack_success_rate",
    "fidelity",
    "membership_inference_auc",
    "relearning_steps",
    "RelearningResult",
]
