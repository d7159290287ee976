"""Training: a Flax ``TrainState`` that carries batch-norm statistics, train and eval steps, and a loop.

The steps are pure functions of ``(state, batch)``; jit them yourself (the library never jits) and hand the jitted
step to :func:`fit` or :func:`evaluate`::

    state = create_train_state(CNN(), jax.random.key(0), (1, 28, 28, 1), optax.adam(1e-3))
    state, history = fit(state, batches(train, 64, seed=0, epochs=2), jax.jit(train_step))
    accuracy = evaluate(state, test, jax.jit(eval_step))["accuracy"]

The same state and steps serve the original (poisoned) model, the retrained reference and fine-tuning-based
unlearning. Training updates the batch-norm running averages; evaluation, curvature and unlearning use them frozen
(eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxforget.models import Batch, init_model

__all__ = ["TrainState", "create_train_state", "train_step", "eval_step", "fit", "evaluate", "predict_logits"]

PyTree = Any


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus ``batch_stats`` (``None`` for a model without batch norm).

    Attributes:
      batch_stats: the model's batch-norm running statistics, or ``None``.
    """

    batch_stats: PyTree = None

    def variables(self) -> dict[str, PyTree]:
        """The variables for ``apply_fn``: params, and batch stats where the model has them."""
        variables = {"params": self.params}
        if self.batch_stats is not None:
            variables["batch_stats"] = self.batch_stats
        return variables


def create_train_state(
    model: nn.Module, key: jax.Array, input_shape: Sequence[int], tx: optax.GradientTransformation
) -> TrainState:
    """Initializes ``model`` on a dummy batch of shape ``input_shape`` ([B, ...]) and wraps it with optimizer ``tx``.

    Initialization is a pure function of ``key``; jit it (``jax.jit(create_train_state, static_argnums=(0, 2, 3))``)
    for large models, where eager initialization dispatches op by op.

    Args:
      model: a Flax linen module.
      key: PRNG key for the initialization.
      input_shape: the dummy batch's shape, [B, ...].
      tx: the optimizer.
    """
    if len(input_shape) < 2:
        raise ValueError(f"input_shape={tuple(input_shape)} must be [batch, ...] with at least two axes.")
    variables = init_model(model, key, input_shape)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables.get("batch_stats")
    )


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean softmax cross-entropy of ``batch``, in training mode.

    Batch norm normalizes with the batch's statistics and updates its running averages.

    Args:
      state: the current state.
      batch: a ``Batch`` of inputs and integer labels.

    Returns:
      ``(state, metrics)`` with ``metrics = {"loss", "accuracy"}`` on the batch, before the step.
    """

    def loss_fn(params):
        variables = {**state.variables(), "params": params}
        if state.batch_stats is None:
            logits, new_stats = state.apply_fn(variables, batch.inputs, train=True), None
        else:
            logits, updated = state.apply_fn(variables, batch.inputs, train=True, mutable=["batch_stats"])
            new_stats = updated["batch_stats"]
        return _cross_entropy(logits, batch.labels), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    return state, {"loss": loss, "accuracy": _accuracy(logits, batch.labels)}


def predict_logits(state: TrainState, inputs: jax.Array) -> jax.Array:
    """Logits [B, C] in eval mode (batch norm with its running averages).

    Args:
      state: the state whose model runs.
      inputs: [B, ...] inputs.
    """
    return state.apply_fn(state.variables(), inputs, train=False)


def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums over ``batch`` in eval mode: ``{"loss_sum", "correct", "count"}``, to be added across batches. ``count``
    is the number of predictions: one per sample, or one per token for a language model's [B, T] labels.

    Args:
      state: the state to evaluate.
      batch: a ``Batch`` of inputs and integer labels ([B] or [B, T]).
    """
    logits = predict_logits(state, batch.inputs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
    return {
        "loss_sum": losses.sum(),
        "correct": jnp.sum(jnp.argmax(logits, axis=-1) == batch.labels),
        "count": jnp.asarray(batch.labels.size),
    }


def _progress(enabled: bool, description: str, total: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    columns.append(TextColumn("{task.fields[status]}"))
    progress = Progress(*columns, disable=not enabled, transient=False)
    task = progress.add_task(description, total=total, status="")
    return progress, task


def fit(
    state: TrainState,
    batches: Iterable[Batch],
    step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]],
    *,
    num_steps: int | None = None,
    progress: bool = True,
    description: str = "training",
    log_every: int = 25,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Runs ``step_fn`` (a jitted :func:`train_step`, or any step with its signature) over ``batches``.

    Args:
      state: the starting state.
      batches: an iterable of batches, e.g. :func:`jaxforget.batches`; the loop ends when it is exhausted or after
        ``num_steps`` steps, whichever comes first.
      step_fn: ``step_fn(state, batch) -> (state, metrics)`` with scalar metrics.
      num_steps: an upper bound on the number of steps (also the length of the progress bar).
      progress: show a progress bar with the running loss (``False`` silences it).
      description: the progress bar's label.
      log_every: how often (in steps) the progress bar fetches the loss from the device.

    Returns:
      ``(state, history)``: the final state and each metric per step as a numpy array.
    """
    if num_steps is not None and num_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be non-negative (or None to run through `batches`).")
    if log_every < 1:
        raise ValueError(f"log_every={log_every} must be at least 1.")
    records = []
    bar, task = _progress(progress, description, num_steps)
    with bar:
        for batch in batches:
            if num_steps is not None and len(records) == num_steps:
                break
            state, metrics = step_fn(state, batch)
            records.append(metrics)
            if len(records) % log_every == 0 and "loss" in metrics:
                bar.update(task, status=f"loss {float(metrics['loss']):.4f}")
            bar.advance(task)
    history = {name: np.asarray([float(r[name]) for r in records]) for name in (records[0] if records else {})}
    return state, history


def evaluate(
    state: TrainState,
    data: Batch,
    eval_fn: Callable[[TrainState, Batch], dict[str, jax.Array]],
    *,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Accuracy and mean loss of ``state`` on ``data``, in batches, with ``eval_fn`` a jitted :func:`eval_step`.

    Every sample counts once (the last batch may be smaller, which compiles ``eval_fn`` a second time).

    Args:
      state: the state to evaluate.
      data: a ``Batch`` holding the whole evaluation set.
      eval_fn: a jitted :func:`eval_step`, or a function with its signature.
      batch_size: rows per evaluation batch.

    Returns:
      ``{"accuracy", "loss", "count"}``.
    """
    n = len(data.labels)
    if n == 0:
        raise ValueError("data is empty; evaluate needs at least one sample.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
    for start in range(0, n, batch_size):
        sums = eval_fn(state, Batch(data.inputs[start : start + batch_size], data.labels[start : start + batch_size]))
        totals = {name: totals[name] + sums[name] for name in totals}
    count = int(totals["count"])
    return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss_sum"]) / count, "count": count}
