"""The main job, stage by stage: train, curvature, select, unlearn, evaluate.

Each stage reads what the previous ones wrote under ``workdir`` and writes its own results there atomically, named by
a key of the settings it depends on and checksummed (:mod:`jaxforget.workdir`). A rerun with the same settings skips
every finished stage; a changed setting reruns the stages that depend on it; a crash mid-stage loses nothing that was
finished; an output found corrupt or missing is recomputed, with the stages after it. The CLI
(:mod:`jaxforget.cli`) is a thin layer over :func:`run_stage`; the settings live in :mod:`jaxforget.settings`.

The protocol: the training data is split once (the same split for every seed) into the training set proper, a
validation set (for tuning, never reported) and a held-out set (the attack set and the membership non-members); the
test split serves only the final scores. The curvature is the Hessian diagonal of the whole training loss (streamed
over every training sample). At the same parameter budget, each selection rule is combined with each unlearning
update, each with its tuned hyperparameters, and every result is scored against the poisoned model and the model
retrained without the poison, each model with its own batch-norm statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxforget import (
    checkpoint,
    curvature,
    data,
    ensembles,
    exposure,
    forgetting,
    metrics,
    models,
    scenarios,
    selection,
    sharding,
    text,
    train,
    unlearn,
)
from jaxforget.settings import (
    ESTIMATOR_OF,
    FINETUNE_UPDATES,
    MAX_FAMILY,
    SELECTIONS,
    STAGES,
    UPDATES,
    RunConfig,
    check_config,
    curvature_estimators,
    hyperparameters,
    method_key,
    methods,
    stage_key,
)
from jaxforget.timing import time_runs
from jaxforget.workdir import Workdir, print_notice

__all__ = [
    "RunConfig",
    "SELECTIONS",
    "UPDATES",
    "STAGES",
    "run_stage",
    "check_config",
    "setup",
    "check_setup",
    "canary_scores",
    "Setup",
    "restore_model",
    "stage_record",
    "stage_arrays",
    "Updates",
    "all_finite",
    "train_family",
    "family_confidences",
]

PyTree = Any
_CURVATURE_BATCH = 64  # samples per batch of the curvature stream


# ----------------------------------------------------------------------------------------------------------------
# Stage records: read through the workdir store, which checks their settings, files and inputs.


def _previous(stage: str, config: RunConfig) -> tuple[tuple[str, str], ...]:
    """``(name, key)`` of the record ``stage`` is computed from: the stage before it (none for train)."""
    index = STAGES.index(stage)
    return () if index == 0 else ((STAGES[index - 1], stage_key(config, STAGES[index - 1])),)


def _require(store: Workdir, stage: str, config: RunConfig) -> dict:
    record = store.record(stage, stage_key(config, stage), then=f"`jaxforget {stage}` or `jaxforget run` recomputes it")
    if record is None:
        raise FileNotFoundError(
            f"stage {stage!r} has not finished in {store.root} for these settings, or its outputs failed their checks; "
            f"run `jaxforget {stage}` (or `jaxforget run`) with the same options first."
        )
    return record


def _arrays(store: Workdir, record: dict, like: PyTree) -> dict[str, PyTree]:
    """The arrays a curvature, select or unlearned-model record describes, checked against its checksum."""
    return store.load_trees(record["arrays"], record["files"][record["arrays"]], like)


def stage_record(stage: str, config: RunConfig, workdir: str | os.PathLike) -> dict:
    """The record ``stage`` wrote for ``config`` in ``workdir``, after checking it and its files.

    Raises:
      FileNotFoundError: if the stage has not finished with these settings or its outputs failed a check.
    """
    return _require(Workdir(workdir), stage, config)


def stage_arrays(stage: str, config: RunConfig, workdir: str | os.PathLike) -> dict[str, PyTree]:
    """The arrays the ``"curvature"`` stage (``{"hessian": ..., "hutchinson": ..., "reference": ...}``) or the
    ``"select"`` stage (``{rule: mask}``) saved for ``config`` in ``workdir``, checked against their record."""
    if stage not in ("curvature", "select"):
        raise ValueError(f"stage={stage!r} saves no arrays; choose 'curvature' or 'select'.")
    store = Workdir(workdir)
    return _arrays(store, _require(store, stage, config), _params_like(setup(config), config))


# ----------------------------------------------------------------------------------------------------------------
# Data, model and the functions every stage jits.


@dataclasses.dataclass(frozen=True)
class Setup:
    """The data and model of one configuration.

    Attributes:
      scenario: (D, Z, Z~) on the training set proper.
      test: the test split (final scores only).
      validation: training samples never trained on, for tuning.
      validation_twin: the validation samples poisoned like Z (for tuning against the attack).
      attack: held-out training samples poisoned like Z: the attack set (attack success).
      non_members: part of ``attack``, as many as Z: the membership-inference non-members.
      model: the Flax model.
      input_shape: ``(1, *sample_shape)``.
      canary: the canary scenario's texts and secret (``None`` for the image scenarios).
      vocab: the canary scenario's character vocabulary.
    """

    scenario: scenarios.Scenario
    test: models.Batch
    validation: models.Batch
    validation_twin: models.Batch
    attack: models.Batch
    non_members: models.Batch
    model: Any
    input_shape: tuple[int, ...]
    canary: scenarios.CanaryScenario | None = None
    vocab: text.CharVocab | None = None


def _take(batch: models.Batch, index: np.ndarray) -> models.Batch:
    return models.Batch(batch.inputs[index], batch.labels[index])


def _subset(batch: models.Batch, size: int, seed: int) -> models.Batch:
    index = np.sort(np.random.default_rng(seed).choice(len(batch.labels), min(size, len(batch.labels)), replace=False))
    return _take(batch, index)


def _split_training_data(full: models.Batch, config: RunConfig) -> tuple[models.Batch, models.Batch, models.Batch]:
    """(training set proper, validation, held-out): stratified, the same for every seed."""
    n = len(full.labels)
    kept = n - config.validation_size - config.holdout_size
    if kept < 2:
        raise ValueError(
            f"--validation-size {config.validation_size} and --holdout-size {config.holdout_size} leave {max(kept, 0)} "
            f"of the {n} training samples of {config.dataset}; together they may be at most {n - 2}."
        )
    aside = f"once --validation-size {config.validation_size} and --holdout-size {config.holdout_size} are set aside"
    if config.group_size >= kept:
        raise ValueError(
            f"--group-size: {config.group_size} leaves no clean sample among the {kept} training samples of "
            f"{config.dataset} left {aside}; the largest valid value is {kept - 1}."
        )
    if config.batch_size > kept - config.group_size:
        raise ValueError(
            f"--batch-size: {config.batch_size} is larger than the {kept - config.group_size} clean training samples "
            f"(without the group of --group-size {config.group_size}) left {aside}; the largest valid value is "
            f"{kept - config.group_size}."
        )
    rest, validation = data.stratified_split(full.labels, config.validation_size / n, seed=0)
    kept_index, holdout = data.stratified_split(full.labels[rest], config.holdout_size / rest.size, seed=1)
    return _take(full, rest[kept_index]), _take(full, validation), _take(full, rest[holdout])


# The canary scenario's text, split by position: training, validation (tuning), held out (membership non-members),
# test (final scores only).
_TEXT_SPLITS = (0.85, 0.05, 0.05, 0.05)


def _text_setup(config: RunConfig) -> Setup:
    """The canary scenario: the corpus split by position, the canary in the training part, windows of
    ``--context`` characters, and a character-level Transformer."""
    corpus = text.load_corpus(config.dataset, data_dir=config.data_dir, download=config.download)
    if config.text_characters:
        corpus = corpus[: config.text_characters]
    vocab = text.build_vocab(corpus)
    parts = text.split_by_position(corpus, _TEXT_SPLITS)
    train_text, validation_text, holdout_text, test_text = parts
    # The smallest split must hold one window of --context characters plus its next character.
    smallest = min(len(part) for part in parts)
    if smallest < config.context + 1:
        needed = math.ceil((config.context + 1) / min(_TEXT_SPLITS))
        raise ValueError(
            f"--text-characters: the {len(corpus):,} characters used leave {smallest} for the smallest split, fewer "
            f"than one window of --context {config.context}; use at least {needed:,} characters or a shorter context."
        )
    try:
        story = scenarios.canary(
            train_text, config.seed, repetitions=config.repetitions, secret_length=config.secret_length
        )
    except ValueError as error:
        raise ValueError(f"--text-characters or --repetitions: {error}") from None
    cut = scenarios.canary_batches(story, vocab, config.context)
    scenario = scenarios.Scenario(
        name="canary",
        train=cut.train,
        group=cut.group,
        corrected=cut.corrected,
        params={"repetitions": config.repetitions, "secret_length": config.secret_length, **text.corpus_record(corpus)},
    )
    clean_rows = len(cut.train.labels) - scenario.size
    if config.batch_size > clean_rows:
        raise ValueError(
            f"--batch-size: {config.batch_size} is larger than the {clean_rows} training windows without the "
            f"canary; the largest valid value is {clean_rows}."
        )

    def windows_of(part: str) -> models.Batch:
        return text.windows(vocab.encode(part), config.context)

    validation, holdout = windows_of(validation_text), windows_of(holdout_text)
    return Setup(
        scenario=scenario,
        test=windows_of(test_text),
        validation=validation,
        validation_twin=validation,
        attack=holdout,
        non_members=_subset(holdout, scenario.size, config.seed + 2),
        model=models.TransformerLM(vocab_size=vocab.size, max_length=config.context),
        input_shape=(1, config.context),
        canary=story,
        vocab=vocab,
    )


@functools.lru_cache(maxsize=4)
def setup(config: RunConfig) -> Setup:
    """Loads the data, splits it, builds the scenario and the model (cached per configuration)."""
    if config.scenario == "canary":
        return _text_setup(config)
    full = data.load(config.dataset, "train", data_dir=config.data_dir, download=config.download)
    test = data.load(config.dataset, "test", data_dir=config.data_dir, download=config.download)
    num_classes = int(max(full.labels.max(), test.labels.max())) + 1
    train_data, validation, holdout = _split_training_data(full, config)
    try:
        if config.scenario == "backdoor":
            scenario = scenarios.backdoor(
                train_data, config.group_size, config.seed, target_class=0, correction=config.correction
            )
        else:
            scenario = scenarios.label_flip(train_data, config.group_size, config.seed, num_classes=num_classes)
    except ValueError as error:  # the group does not fit the samples the scenario may draw from
        raise ValueError(f"--group-size: {config.group_size} does not fit {config.dataset} ({error})") from None
    dtype = None if config.precision == "float32" else jnp.dtype(config.precision)  # compute dtype only
    model = {
        "cnn": lambda: models.CNN(num_classes=num_classes, dtype=dtype),
        "mlp": lambda: models.MLP(num_classes=num_classes, hidden=(256,), activation="relu", dtype=dtype),
        "resnet18": lambda: models.ResNet18(num_classes=num_classes, width=config.width, dtype=dtype),
    }[config.model]()
    attack = scenarios.poison_like(holdout, scenario, seed=config.seed)
    return Setup(
        scenario=scenario,
        test=test,
        validation=validation,
        validation_twin=scenarios.poison_like(validation, scenario, seed=config.seed),
        attack=attack,
        non_members=_subset(attack, scenario.size, config.seed + 2),
        model=model,
        input_shape=(1, *train_data.inputs.shape[1:]),
    )


@functools.lru_cache(maxsize=16)  # every stage call checks; a configuration that passed once passes again
def check_setup(config: RunConfig) -> None:
    """Raises ``ValueError`` naming the option, its valid range and the fix for settings that pass
    :func:`~jaxforget.settings.check_config` but do not fit the data or the model: splits larger than the data, a
    group or a batch that does not fit, a budget that selects no parameter. Loads the data; computes nothing else."""
    if config.devices > jax.device_count():
        raise ValueError(
            f"--devices: {config.devices} asked for, but JAX sees {jax.device_count()} "
            f"({jax.default_backend()}); pass 0 for all of them, or at most {jax.device_count()}."
        )
    setup_ = setup(config)
    total = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(_params_like(setup_, config)))
    if round(config.budget * total) < 1:
        raise ValueError(
            f"--budget: {config.budget:g} selects none of the {total:,} parameters of the {config.model}; the "
            f"smallest budget that selects one is 1/{total} = {1 / total:.3g}."
        )


def _new_state(setup: Setup, config: RunConfig, tx) -> train.TrainState:
    init = jax.jit(lambda key: train.create_train_state(setup.model, key, setup.input_shape, tx))
    return init(jax.random.key(config.seed))


def training_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """The optimizer the train stage trains every model with: Adam at ``learning_rate`` (AdamW with a weight decay),
    or, with ``optimizer="sgd"``, SGD with Nesterov momentum 0.9 and an L2 weight decay, its rate warmed up linearly
    over the first 2% of ``train_steps`` and then decayed to 0 on a cosine (the usual CIFAR-10 ResNet recipe)."""
    if config.optimizer == "sgd":
        steps = config.train_steps
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, warmup_steps=max(1, steps // 50), decay_steps=max(steps, 2)
        )
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay), optax.sgd(schedule, momentum=0.9, nesterov=True)
        )
    if config.weight_decay:
        return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    return optax.adam(config.learning_rate)


def _training_stream(training_set: models.Batch, config: RunConfig, epochs: int) -> Iterator[models.Batch]:
    """The train stage's batches: shuffled by ``config.seed``, augmented when ``config.augment`` asks for it."""
    stream = data.batches(training_set, config.batch_size, seed=config.seed, epochs=epochs)
    if config.augment == "none":
        return stream
    rng = np.random.default_rng([config.seed, 1])  # the same augmentations for the poisoned and retrained models
    return (data.crop_flip(batch, rng) for batch in stream)


def _variables_like(setup_: Setup, config: RunConfig) -> dict[str, PyTree]:
    """The ``params`` and ``batch_stats`` structures, shapes and dtypes, without initializing the model."""
    init = lambda key: train.create_train_state(setup_.model, key, setup_.input_shape, optax.sgd(0.0))  # noqa: E731
    state = jax.eval_shape(init, jax.random.key(config.seed))
    return {"params": state.params, "batch_stats": state.batch_stats}


def _params_like(setup_: Setup, config: RunConfig) -> PyTree:
    return _variables_like(setup_, config)["params"]


def restore_model(workdir: str | os.PathLike, name: str, config: RunConfig) -> train.TrainState:
    """The ``"poisoned"`` or ``"retrained"`` model that the train stage checkpointed in ``workdir`` for ``config``
    (its files verified against their checksums first).

    Raises:
      FileNotFoundError: if the train stage has not saved it for these settings.
      CorruptFileError: if the checkpoint fails its check.
    """
    directory = Workdir(workdir).checkpoint_dir(name, stage_key(config, "train"))
    state, _, _ = checkpoint.restore_checkpoint(
        directory, _new_state(setup(config), config, training_optimizer(config))
    )
    return state


def device_count(config: RunConfig) -> int:
    """The devices the stages may split work over: ``--devices``, or every device JAX sees with 0."""
    return jax.device_count() if config.devices == 0 else min(config.devices, jax.device_count())


def _data_mesh(config: RunConfig, size: int):
    """A ``"data"`` mesh over the most devices (at most :func:`device_count`) that split batches of ``size``
    evenly, or ``None`` when that is one device. Split batches give the single-device numbers up to the order of
    floating-point summation, so the device count is no stage setting."""
    count = sharding.usable_devices(device_count(config), size)
    return None if count == 1 else sharding.data_mesh(jax.devices()[:count])


def _place(mesh, batch: models.Batch) -> models.Batch:
    """``batch`` split over ``mesh``'s devices when they divide it evenly, else whole on each; as it is without a
    mesh."""
    if mesh is None:
        return batch
    if len(batch.labels) % mesh.size == 0:
        return sharding.shard_batch(batch, mesh)
    return sharding.replicate(batch, mesh)


def _chunks(batch: models.Batch, size: int) -> list[models.Batch]:
    """Consecutive batches of ``min(size, n)`` rows, in order; the last one holds the remainder."""
    return list(data.batches(batch, min(size, len(batch.labels)), seed=0, shuffle=False, drop_remainder=False))


def _median_seconds(fn: Callable, args: tuple, repeats: int) -> tuple[Any, float]:
    """The output of ``fn(*args)`` and the median seconds of ``repeats`` runs after a warm-up (compilation)."""
    times, _, output = time_runs(fn, args, repeats=repeats)
    return output, float(np.median(times))


class _Log:
    """Progress lines (silenced by ``quiet``) and notices (always shown, on standard error)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    notice = staticmethod(print_notice)


def _tree_count(tree: PyTree) -> int:
    return sum(int(np.sum(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: train the poisoned model and the retrained reference (same initialization and batch order).


_LONG_SECONDS = 300.0  # a stage estimated to take longer is announced even with --quiet


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _estimate_training(step: Callable, state, stream, config: RunConfig, models_left: int, log: _Log) -> None:
    """Times two training steps after compiling one, and announces how long the models left will take."""
    batch = next(stream)
    state, _ = jax.block_until_ready(step(state, batch))
    start = time.perf_counter()
    for _ in range(2):
        state, _ = jax.block_until_ready(step(state, batch))
    per_step = (time.perf_counter() - start) / 2
    total = per_step * config.train_steps * models_left
    message = (
        f"train: {1e3 * per_step:.1f} ms a step here, so about {_duration(total)} for {models_left} model(s) of "
        f"{config.train_steps} steps ({config.model} on {jax.default_backend()})"
    )
    if total > _LONG_SECONDS:
        log.notice(f"{message}; lower --train-steps (or --width) for a quicker run")
    else:
        log(message)


def _stage_train(store: Workdir, config: RunConfig, log: _Log) -> tuple[dict, dict]:
    setup_ = setup(config)
    step, evaluate_step = jax.jit(train.train_step), jax.jit(train.eval_step)
    key = stage_key(config, "train")
    mesh = _data_mesh(config, config.batch_size)
    devices = 1 if mesh is None else mesh.size
    record = {"models": {}, "train_samples": len(setup_.scenario.train.labels), "devices": devices}
    files, pending = {}, []
    for name, training_set in (("poisoned", setup_.scenario.train), ("retrained", setup_.scenario.clean)):
        done = store.record(name, key)
        if done is None:
            pending.append((name, training_set))
            continue
        record["models"][name] = done
        files.update(done["files"])
        log(f"train: {name} model already trained (reusing {store.checkpoint_dir(name, key)})")
    for index, (name, training_set) in enumerate(pending):
        state = _new_state(setup_, config, training_optimizer(config))
        epochs = -(-config.train_steps // (len(training_set.labels) // config.batch_size))  # full batches only
        if mesh is not None:  # the state on every device, each batch split over them
            state = sharding.replicate(state, mesh)
        place = functools.partial(_place, mesh)
        if index == 0:
            probe = map(place, _training_stream(training_set, config, 1))
            _estimate_training(step, state, probe, config, len(pending), log)
        stream = map(place, _training_stream(training_set, config, epochs))
        start = time.perf_counter()
        state, history = train.fit(
            state, stream, step, num_steps=config.train_steps, progress=not log.quiet, description=f"train {name}"
        )
        seconds = time.perf_counter() - start
        accuracy = train.evaluate(state, setup_.validation, evaluate_step)["accuracy"]
        directory = store.checkpoint_dir(name, key)
        checkpoint.save_checkpoint(
            directory, state, metadata={"stage_key": key, "config": dataclasses.asdict(config), "model": name}
        )
        relative, digest = store.checkpoint_digest(directory)
        entry = {"seconds": seconds, "final_loss": float(history["loss"][-1]), "validation_accuracy": accuracy}
        record["models"][name] = store.write_record(name, key, entry, files={relative: digest})
        files[relative] = digest
        on = f", batches split over {devices} devices" if devices > 1 else ""
        log(
            f"train: {name} model, validation accuracy {accuracy:.4f} ({config.train_steps} steps, {seconds:.1f} s{on})"
        )
    if config.forgetting:
        record["families"], family_files = _train_families(store, setup_, config, key, log)
        files.update(family_files)
    return record, files


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: curvature estimates at the poisoned parameters, streamed over the whole training set.


# For a language model the exact Hessian diagonal is out of reach (one Hessian-vector product per parameter and
# window), and it differs from the exact GGN's (GELU, softmax attention and LayerNorm are not piecewise linear).
# Measured on the default canary model (benchmarks/canary_curvature.py, against Hutchinson with 32 probes per batch,
# its own noise subtracted): the Monte Carlo GGN is within 12% of diag(H) and selects its top 1% best, at a fraction
# of the cost of Hutchinson with 8 probes (error 0.44) or of Hutchinson on H - G. So the Hessian rule ranks by it,
# with this many sampled label sequences per window (the gnb rule draws one).
_LANGUAGE_HESSIAN_SAMPLES = 8


def hessian_estimator(config: RunConfig) -> str:
    """What the ``hessian`` curvature (the Hessian rules' scores) is for ``config``, for the records."""
    if config.model == "transformer":
        return f"Monte Carlo GGN, {_LANGUAGE_HESSIAN_SAMPLES} sampled label sequences per window"
    return "exact GGN diagonal (= the exact Hessian diagonal for these piecewise-linear networks)"


def _estimators(model, probes: int) -> dict[str, Callable]:
    """Jitted ``estimator(params, batch_stats, batch, key) -> diagonal``, each on the mean loss over ``batch``;
    ``"unlearning-gradient"`` takes the pair ``(Z, Z~)`` as its batch."""

    def hessian(params, stats, batch, key):
        if isinstance(model, models.TransformerLM):  # see hessian_estimator
            logits_fn = models.logits_fn_for(model, stats)
            return curvature.gnb_diagonal(logits_fn, params, batch.inputs, key, num_samples=_LANGUAGE_HESSIAN_SAMPLES)
        return curvature.ggn_diagonal(models.logits_fn_for(model, stats), params, batch.inputs)

    def hutchinson(params, stats, batch, key):
        return curvature.hutchinson_diagonal(models.loss_fn_for(model, stats), params, batch, key, num_probes=probes)

    def gnb(params, stats, batch, key):
        return curvature.gnb_diagonal(models.logits_fn_for(model, stats), params, batch.inputs, key)

    def fisher(params, stats, batch, key):
        del key
        return curvature.fisher_diagonal(models.loss_fn_for(model, stats), params, batch)

    def gradient(params, stats, batch, key):
        del key
        return curvature.gradient_saliency(models.loss_fn_for(model, stats), params, batch)

    def unlearning_gradient(params, stats, pair, key):
        del key
        old, new = pair
        difference = unlearn.gradient_difference(models.loss_fn_for(model, stats), params, old, new)
        return jax.tree.map(jnp.abs, difference)

    named = {
        "hessian": hessian,
        "hutchinson": hutchinson,
        "gnb": gnb,
        "fisher": fisher,
        "gradient": gradient,
        "unlearning-gradient": unlearning_gradient,
    }
    return {name: jax.jit(fn) for name, fn in named.items()}


def _stream(fn: Callable, params, stats, batches: list, key) -> tuple[PyTree, float]:
    """The example-weighted mean of ``fn`` over ``batches`` and its seconds, compilation (every shape) excluded."""
    shapes = {}
    for batch in batches:
        shapes.setdefault(jax.tree.map(np.shape, batch), batch)
    for batch in shapes.values():
        jax.block_until_ready(fn(params, stats, batch, key))
    start = time.perf_counter()
    diagonal = curvature.accumulate_diagonal(lambda batch, k: fn(params, stats, batch, k), batches, key)
    return jax.block_until_ready(diagonal), time.perf_counter() - start


def _stage_curvature(store: Workdir, config: RunConfig, log: _Log) -> tuple[dict, dict]:
    setup_ = setup(config)
    state = restore_model(store.root, "poisoned", config)
    params, stats = state.params, state.batch_stats
    scenario = setup_.scenario
    training = scenario.train
    sample = training if config.curvature_samples == 0 else _subset(training, config.curvature_samples, config.seed)
    # The parameters on every device, each batch split over them (the last, short one whole).
    mesh = _data_mesh(config, _CURVATURE_BATCH)
    plain = _chunks(sample, _CURVATURE_BATCH)  # on the host; the families place them along their model axis
    chunks = whole = [_place(mesh, b) for b in plain]
    if mesh is not None:
        params, stats = sharding.replicate((params, stats), mesh)
        # Not split for the empirical Fisher: XLA (jax 0.10.2) partitions the batch-grouped convolution of its
        # vmapped per-example gradients wrongly (the kernel gradients of examples off the first device come out
        # wrong; benchmarks/sharding.py), so every device computes the whole batch.
        whole = sharding.replicate(plain, mesh)
    needed = curvature_estimators(config)
    estimators = _estimators(setup_.model, config.probes)
    key = jax.random.key(config.seed)
    diagonals, seconds = {}, {}
    for name in needed:
        if name == "unlearning-gradient":
            pair = (scenario.poisoned_group, scenario.corrected)
            diagonals[name], seconds[name] = _median_seconds(
                estimators[name], (params, stats, pair, key), config.timing_repeats
            )
            samples = 2 * scenario.size
        else:
            batches = [scenario.poisoned_group] if name == "gradient" else whole if name == "fisher" else chunks
            diagonals[name], seconds[name] = _stream(estimators[name], params, stats, batches, key)
            samples = sum(len(b.labels) for b in batches)
        log(f"curvature: {name} on {samples} samples in {seconds[name]:.2f} s")
    if config.curvature_samples == 0 or isinstance(setup_.model, models.TransformerLM):
        # A language model has no exact diagonal to score against: recall is against the Hessian rule's estimate.
        reference, reference_samples = diagonals["hessian"], len(sample.labels)
    else:  # the selection quality is always scored against the whole training loss's diagonal
        every = [_place(mesh, b) for b in _chunks(training, _CURVATURE_BATCH)]
        reference, _ = _stream(estimators["hessian"], params, stats, every, key)
        reference_samples = len(training.labels)
        log(f"curvature: the whole-data exact diagonal (reference for top-k recall) on {reference_samples} samples")

    grad = jax.jit(jax.grad(lambda p, s, b: models.loss_fn_for(setup_.model, s)(p, b)))
    batch = _take(training, np.arange(min(config.batch_size, len(training.labels))))
    _, gradient_seconds = _median_seconds(grad, (params, stats, batch), 5)

    trees = {**diagonals, "reference": reference}
    arrays, digest = store.save_trees("curvature", stage_key(config, "curvature"), trees)
    files = {arrays: digest}
    flat = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(reference)])
    record = {
        "arrays": arrays,
        "hessian_estimator": hessian_estimator(config),
        "samples": len(sample.labels),
        "reference_samples": reference_samples,
        "seconds": seconds,
        "gradient_seconds": gradient_seconds,
        "gradient_batch": int(len(batch.labels)),
        "zero_share": float(np.mean(flat == 0)),
        "devices": 1 if mesh is None else mesh.size,  # the batches were split over these
    }
    log(
        f"curvature: one gradient on {len(batch.labels)} samples takes {1e3 * gradient_seconds:.1f} ms; "
        f"{record['zero_share']:.1%} of the exact diagonal is exactly zero"
    )
    if config.forgetting:
        record["family"] = _family_curvature(store, setup_, config, needed, plain, log)
        files.update(record["family"]["files"])
    return record, files


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: masks at the budget.


def _masks(setup_: Setup, config: RunConfig, state: train.TrainState, diagonals: dict[str, PyTree]):
    """``make_mask(name) -> mask`` for every selection rule; ``mask_of(name, diagonals, params, key) -> mask``, the
    same rule for any model of this architecture (pure, so it vmaps over a family); the layers the "last-layers" rule
    draws from."""
    params = state.params
    top = jax.jit(selection.select_top, static_argnames=("fraction", "largest"))
    random_top = jax.jit(selection.select_random, static_argnames="fraction")
    logits_fn = models.logits_fn_for(setup_.model, state.batch_stats)
    inputs = jax.ShapeDtypeStruct(setup_.input_shape, jnp.float32)
    layers = selection.layers_in_call_order(logits_fn, params, inputs)
    total = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    last_layers = selection.last_layers_holding(params, layers, max(1, round(config.budget * total)))
    inside = selection.select_layers(params, last_layers)

    def mask_of(name, diagonals, params, key):
        hessian = diagonals.get("hessian")
        if name == "hessian-smallest-nonzero":  # zeros (dead units) would be chosen first, and nothing would move
            scores = jax.tree.map(lambda d: jnp.where(d != 0, d, jnp.inf), hessian)
            return top(scores, fraction=config.budget, largest=False)
        if name == "last-layers":
            scores = jax.tree.map(lambda d, m: jnp.where(m, d, -jnp.inf), hessian, inside)
            return top(scores, fraction=config.budget, largest=True)
        if name in ESTIMATOR_OF:
            return top(diagonals[ESTIMATOR_OF[name]], fraction=config.budget, largest=not name.endswith("smallest"))
        if name == "random":
            return random_top(params, fraction=config.budget, key=key)
        if name == "last-layer":
            return selection.select_layers(params, layers[-1])
        return jax.tree.map(lambda p: np.ones(p.shape, bool), params)

    def make_mask(name):
        return mask_of(name, diagonals, params, jax.random.key(config.seed))

    return make_mask, mask_of, last_layers


def _stage_select(store: Workdir, config: RunConfig, log: _Log) -> tuple[dict, dict]:
    setup_ = setup(config)
    state = restore_model(store.root, "poisoned", config)
    curvature_record = _require(store, "curvature", config)
    diagonals = _arrays(store, curvature_record, state.params)
    make_mask, mask_of, last_layers = _masks(setup_, config, state, diagonals)
    reference_top = selection.select_top(diagonals["reference"], config.budget)
    reference_count = _tree_count(reference_top)
    masks, summary = {}, {}
    total = sum(int(np.size(p)) for p in jax.tree.leaves(state.params))
    for name in config.selections:
        masks[name], seconds = _median_seconds(make_mask, (name,), config.timing_repeats)
        found = sum(
            int(np.sum(np.asarray(a) & np.asarray(b)))
            for a, b in zip(jax.tree.leaves(masks[name]), jax.tree.leaves(reference_top), strict=True)
        )
        selected = _tree_count(masks[name])
        summary[name] = {
            "selected": selected,
            "fraction": selected / total,
            "top_k_recall": found / reference_count,  # share of the whole-data Hessian's top entries it holds
            "seconds": seconds,
        }
    summary.get("last-layers", {})["layers"] = last_layers
    if any(entry["selected"] == 0 for entry in summary.values()):
        empty = [name for name, entry in summary.items() if entry["selected"] == 0]
        raise ValueError(f"--budget {config.budget:g} selects no parameter for {', '.join(empty)}; raise it.")
    arrays, digest = store.save_trees("masks", stage_key(config, "select"), masks)
    log(f"select: {len(masks)} masks over {total:,} parameters at budget {config.budget:g}")
    record, files = {"arrays": arrays, "num_params": total, "masks": summary}, {arrays: digest}
    if config.forgetting:
        record["family"] = _family_masks(store, setup_, config, mask_of, curvature_record, log)
        files.update(record["family"]["files"])
    return record, files


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: every (selection, update) pair from the poisoned parameters.


def _method_name(selection_name: str, update: str) -> str:
    return f"{selection_name}/{update}"


def _scalars_to_python(tree: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in tree.items()}


def _one_step_updates(setup_: Setup, num_train: int) -> dict[str, Callable]:
    """Jitted first-order and diagonal-Newton updates; the step size and the damping are traced arguments, so one
    compilation serves every selection rule's tuned value."""
    model = setup_.model

    def first_order(params, stats, old, new, mask, tau):
        loss_fn = models.loss_fn_for(model, stats)
        return unlearn.first_order_update(loss_fn, params, old, new, tau=tau, mask=mask)

    def diagonal_newton(params, stats, old, new, mask, diagonal, damping):
        loss_fn = models.loss_fn_for(model, stats)
        return unlearn.diagonal_newton_update(
            loss_fn, params, old, new, diagonal, num_train=num_train, mask=mask, damping=damping
        )

    return {"first-order": jax.jit(first_order), "diagonal-newton": jax.jit(diagonal_newton)}


def _hessian_batches(setup_: Setup, config: RunConfig) -> models.Batch:
    """The stacked [K, 64, ...] training batches CG takes its Hessian-vector products on."""
    sample = _subset(setup_.scenario.train, config.hessian_samples, config.seed + 1)
    return unlearn.stack_batches(list(data.batches(sample, min(64, len(sample.labels)), seed=0, shuffle=False)))


@functools.lru_cache(maxsize=8)
def _cg_update(model, num_train: int, damping: float, iterations: int) -> Callable:
    """The jitted masked CG update ``(params, stats, old, new, mask, hessian_batches) -> (params, diagnostics)``."""

    def cg(params, stats, old, new, mask, hessian_batches):
        return unlearn.second_order_update(
            models.loss_fn_for(model, stats),
            params,
            old,
            new,
            hessian_batches,
            num_train=num_train,
            mask=mask,
            damping=damping,
            max_iterations=iterations,
            tol=1e-3,
        )

    return jax.jit(cg)


@functools.lru_cache(maxsize=8)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)  # one object per rate, so one compiled step serves every mask


class _Finetuning:
    """The data of the fine-tuning variants: Z~ in order with its remainder, retained batches, Z for ascent."""

    def __init__(self, setup_: Setup, config: RunConfig):
        scenario = setup_.scenario
        self.batch = min(config.batch_size, scenario.size)
        self.new = _chunks(scenario.corrected, self.batch)
        self.old = _chunks(scenario.poisoned_group, self.batch)
        retained = np.setdiff1d(np.arange(len(scenario.train.labels)), scenario.group)
        self.retain_data = _take(scenario.train, retained)
        self.seed = config.seed
        self.compiled: set = set()

    def _retained(self, update: str, steps: int) -> list[models.Batch] | None:
        """The retained batch of each step (None for the variant that sees Z~ only)."""
        if update == "finetune-corrected":
            return None
        epochs = -(-steps * self.batch // len(self.retain_data.labels))
        stream = data.batches(self.retain_data, self.batch, seed=self.seed, epochs=epochs)
        return [b for b, _ in zip(stream, range(steps), strict=False)]

    def run_family(self, template, variables: dict, update: str, masks, values: dict, sequential: bool) -> PyTree:
        """The stacked params of a family (``variables``) after ``update``: each model fine-tuned on the same
        batches as :meth:`run` uses, from a fresh optimizer, with only its own mask free."""
        steps, retain = values["finetune_steps"], self._retained(update, values["finetune_steps"])
        ascent = values.get("ascent_weight", 0.0) if update == "finetune-ascent" else 0.0
        count = ensembles.num_models(masks)
        state = template.replace(
            params=variables["params"], batch_stats=variables["batch_stats"], step=jnp.zeros(count, jnp.int32)
        )
        state = ensembles.with_stacked_optimizer(state, _adam(values["finetune_lr"]), masks)
        step = _family_finetune_step(retain is not None, ascent, sequential)
        for i in range(steps):
            old = self.old[i % len(self.old)] if ascent > 0 else None
            kept = None if retain is None else retain[i % len(retain)]  # cycled, as finetune_unlearn does
            state, _ = step(state, self.new[i % len(self.new)], kept, old)
        return state.params

    def run(self, state, update: str, mask, values: dict):
        steps = values["finetune_steps"]
        retain = self._retained(update, steps)
        ascent = values.get("ascent_weight", 0.0) if update == "finetune-ascent" else 0.0

        def go(count):
            return unlearn.finetune_unlearn(
                state,
                self.new,
                retain,
                tx=_adam(values["finetune_lr"]),
                mask=mask,
                steps=count,
                old_batches=self.old if ascent > 0 else None,
                ascent_weight=ascent,
            )

        signature = (update, values["finetune_lr"], ascent)
        if signature not in self.compiled:  # every batch shape once: Z~'s remainder batch is smaller
            jax.block_until_ready(go(len(self.new))[0].params)
            self.compiled.add(signature)
        seen = {"corrected": sum(len(self.new[i % len(self.new)].labels) for i in range(steps))}
        if retain is not None:
            seen["retained"] = steps * self.batch
        if ascent > 0:
            seen["ascent"] = sum(len(self.old[i % len(self.old)].labels) for i in range(steps))
        return go, steps, {"data": FINETUNE_UPDATES[update], "samples_seen": seen}


class Updates:
    """Every unlearning update of the main job from the poisoned model, for any mask and hyperparameters: the unlearn
    stage times and records them, ``experiments/tune.py`` scores them over its grids."""

    def __init__(self, setup_: Setup, config: RunConfig, state: train.TrainState, hessian: PyTree):
        scenario = setup_.scenario
        self.setup, self.config, self.state, self.hessian = setup_, config, state, hessian
        self.old, self.new = scenario.poisoned_group, scenario.corrected
        self.num_train = len(scenario.train.labels)
        self.one_step = _one_step_updates(setup_, self.num_train)
        self.finetuning = _Finetuning(setup_, config)

    @functools.cached_property
    def _stacked(self) -> models.Batch:  # built on CG's first use only
        return _hessian_batches(self.setup, self.config)

    def runner(self, update: str, mask: PyTree, values: dict) -> tuple[Callable[[], tuple[PyTree, dict]], dict]:
        """``(run, extra)``: ``run() -> (new_params, diagnostics)`` applies ``update`` with ``values`` (its
        hyperparameters) on ``mask``; ``extra`` describes the data a fine-tuning variant saw (else empty)."""
        params, stats = self.state.params, self.state.batch_stats
        if update in FINETUNE_UPDATES:
            go, steps, extra = self.finetuning.run(self.state, update, mask, values)

            def finetune():
                final, info = go(steps)
                return final.params, {k: v for k, v in info.items() if k != "loss"}

            return finetune, extra
        if update == "cg":
            fn = _cg_update(self.setup.model, self.num_train, float(values["cg_damping"]), self.config.cg_iterations)
            return functools.partial(fn, params, stats, self.old, self.new, mask, self._stacked), {}
        if update == "first-order":
            args = (params, stats, self.old, self.new, mask, jnp.float32(values["tau"]))
        else:
            args = (params, stats, self.old, self.new, mask, self.hessian, jnp.float32(values["damping"]))
        return functools.partial(self.one_step[update], *args), {}

    def family_runner(
        self, update: str, variables: dict[str, PyTree], masks: PyTree, hessian: PyTree, values: dict
    ) -> Callable[[], PyTree]:
        """``run() -> new params [K, ...]``: ``update`` with ``values`` applied to each model of a stacked family
        (``variables``: its ``params`` and ``batch_stats``), each with its own mask and Hessian estimate."""
        params, stats = variables["params"], variables["batch_stats"]
        sequential = _sequential_models(self.config)
        if update in FINETUNE_UPDATES:
            run = self.finetuning.run_family
            return functools.partial(run, self.state, variables, update, masks, values, sequential)
        if update == "cg":
            fn = _cg_update(self.setup.model, self.num_train, float(values["cg_damping"]), self.config.cg_iterations)
            each = _family_function(fn, (0, 0, None, None, 0, None), sequential)
            return lambda: each(params, stats, self.old, self.new, masks, self._stacked)[0]
        if update == "first-order":
            each = _family_function(self.one_step[update], (0, 0, None, None, 0, None), sequential)
            args = (params, stats, self.old, self.new, masks, jnp.float32(values["tau"]))
        else:
            each = _family_function(self.one_step[update], (0, 0, None, None, 0, 0, None), sequential)
            args = (params, stats, self.old, self.new, masks, hessian, jnp.float32(values["damping"]))
        return lambda: each(*args)[0]


@functools.lru_cache(maxsize=16)
def _family_function(fn: Callable, in_axes: tuple, sequential: bool) -> Callable:
    """``fn`` over a family's model axis, compiled once per function (one compilation serves every method)."""
    return ensembles.map_models(fn, in_axes, sequential=sequential)


@functools.lru_cache(maxsize=8)
def _family_finetune_step(retain: bool, ascent_weight: float, sequential: bool) -> Callable:
    """:func:`jaxforget.unlearn.finetune_step` over a stacked state's model axis, jitted."""
    step = functools.partial(unlearn.finetune_step, retain_weight=1.0 if retain else 0.0, ascent_weight=ascent_weight)
    return ensembles.map_models(step, (0, None, None, None), sequential=sequential)


def all_finite(tree: PyTree) -> bool:
    """Whether every entry of every leaf of ``tree`` is finite (on the host)."""
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))


def _stage_unlearn(store: Workdir, config: RunConfig, log: _Log) -> tuple[dict, dict]:
    setup_ = setup(config)
    state = restore_model(store.root, "poisoned", config)
    masks = _arrays(store, _require(store, "select", config), state.params)
    hessian = _arrays(store, _require(store, "curvature", config), state.params)["hessian"]
    updates = Updates(setup_, config, state, hessian)
    inputs = (("select", stage_key(config, "select")), ("curvature", stage_key(config, "curvature")))
    record, files = {"methods": {}}, {}
    for selection_name, update in methods(config):
        name = _method_name(selection_name, update)
        output, this_key = f"unlearned/{selection_name}--{update}", method_key(config, selection_name, update)
        entry = store.record(output, this_key, report_stale=False)  # stale: the stage's own notice says why
        if entry is None:
            mask = masks[selection_name]
            values = hyperparameters(config, update, selection_name)
            run, extra = updates.runner(update, mask, values)
            (new_params, info), seconds = _median_seconds(run, (), config.timing_repeats)
            if not all_finite(new_params):
                raise ValueError(
                    f"{name} produced non-finite parameters with {values}; lower the step size (--tau, "
                    "--finetune-lr) or raise the damping."
                )
            arrays, digest = store.save_trees(output, this_key, {"params": new_params})
            entry = {
                "seconds": seconds,
                "hyperparameters": values,
                "diagnostics": _scalars_to_python({k: np.asarray(v) for k, v in info.items()}),
                "arrays": arrays,
                **extra,
            }
            entry = store.write_record(output, this_key, entry, files={arrays: digest}, inputs=inputs)
            log(f"unlearn: {name:<42} {seconds:7.3f} s")
        files.update(entry["files"])
        record["methods"][name] = {k: v for k, v in entry.items() if k != "inputs"}
    if config.forgetting:
        record["family"], family_files = _family_unlearn(store, setup_, config, updates, log)
        files.update(family_files)
    return record, files


# ----------------------------------------------------------------------------------------------------------------
# Stage 5: score every model against the poisoned one and the retrained reference.


def _predictions(setup_: Setup):
    """``(params, stats, batch) -> (predicted classes, per-sample losses)``, jitted, in chunks of 500. For a
    language model the predictions are per token and the loss of a window is the mean over its tokens."""

    @jax.jit
    def predict(params, stats, inputs, labels):
        logits = models.logits_fn_for(setup_.model, stats)(params, inputs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.argmax(logits, -1), losses.reshape(losses.shape[0], -1).mean(axis=1)

    def run(params, stats, batch: models.Batch, size: int = 500):
        outputs = [
            predict(params, stats, batch.inputs[i : i + size], batch.labels[i : i + size])
            for i in range(0, len(batch.labels), size)
        ]
        return np.concatenate([np.asarray(o[0]) for o in outputs]), np.concatenate([np.asarray(o[1]) for o in outputs])

    return run


_EXACT_EXPOSURE_SPACE = 10**6  # up to this many candidate secrets, exposure is exact by enumeration


def canary_scores(setup_: Setup, config: RunConfig) -> Callable[[PyTree], dict]:
    """``scores(params)`` for the canary scenario: the secret's exposure (exact by enumeration up to 10^6
    candidates, else the skew-normal estimate) and ``log2_space``, and the digits of the secret that greedy decoding
    after the prefix reproduces (``digits_extracted`` of ``secret_digits``)."""
    story, vocab, model = setup_.canary, setup_.vocab, setup_.model
    log_probs = jax.jit(lambda params, tokens: jax.nn.log_softmax(model.apply({"params": params}, tokens)))
    prompt = vocab.encode(story.separator + story.prefix)
    secret, alphabet = vocab.encode(story.secret), vocab.encode(story.alphabet)
    exact = len(story.alphabet) ** len(story.secret) <= _EXACT_EXPOSURE_SPACE

    def scores(params) -> dict:
        fn = functools.partial(log_probs, params)
        limit = {"max_length": config.context}
        if exact:
            found = exposure.exact_rank_and_exposure(fn, prompt, secret, alphabet, **limit)
        else:
            found = exposure.estimated_exposure(fn, prompt, secret, alphabet, jax.random.key(config.seed), **limit)
        extracted = exposure.greedy_extraction(fn, prompt, secret, alphabet, **limit)
        return {
            "exposure": float(found["exposure"]),
            "log2_space": float(found["log2_space"]),
            "digits_extracted": int(extracted["digits_correct"]),
            "secret_digits": len(story.secret),
        }

    return scores


def _selection_cost(name: str, update: str, curvature_record: dict, select_record: dict) -> float:
    """Seconds of the curvature a method needs (its selection's estimate, plus the exact diagonal for diagonal
    Newton when the selection ranks by another), and of the selection itself."""
    seconds = curvature_record["seconds"]
    estimates = {ESTIMATOR_OF[name]} if name in ESTIMATOR_OF else set()
    if update == "diagonal-newton":
        estimates.add("hessian")
    return sum(seconds[e] for e in estimates) + select_record["masks"][name]["seconds"]


def _stage_evaluate(store: Workdir, config: RunConfig, log: _Log) -> tuple[dict, dict]:
    setup_ = setup(config)
    scenario = setup_.scenario
    poisoned = restore_model(store.root, "poisoned", config)
    retrained = restore_model(store.root, "retrained", config)
    curvature_record = _require(store, "curvature", config)
    select_record = _require(store, "select", config)
    unlearn_record = _require(store, "unlearn", config)
    predict = _predictions(setup_)
    group = scenario.poisoned_group
    group_batches = _chunks(group, config.batch_size)
    relearn_step = jax.jit(train.train_step)
    reference = {
        "test": predict(retrained.params, retrained.batch_stats, setup_.test)[0],
        "group": predict(retrained.params, retrained.batch_stats, group)[0],
    }
    # Relearning: steps on Z (its poisoned labels) until Z is fit as well as the poisoned model fits it.
    poisoned_fit = metrics.accuracy(predict(poisoned.params, poisoned.batch_stats, group)[0], group.labels)

    canary = canary_scores(setup_, config) if setup_.canary is not None else None

    def score(params, stats) -> dict:
        test_pred, test_losses = predict(params, stats, setup_.test)
        attack_pred, _ = predict(params, stats, setup_.attack)
        fixed_pred, _ = predict(params, stats, scenario.corrected)
        group_pred, member_losses = predict(params, stats, group)
        _, outsider_losses = predict(params, stats, setup_.non_members)
        state = poisoned.replace(params=params, batch_stats=stats, opt_state=poisoned.tx.init(params))
        relearn = metrics.relearning_steps(
            relearn_step,
            state,
            group_batches,
            lambda s: metrics.accuracy(predict(s.params, s.batch_stats, group)[0], group.labels),
            threshold=poisoned_fit,
            max_steps=config.relearn_steps,
        )
        scores = {
            "test_accuracy": metrics.accuracy(test_pred, setup_.test.labels),
            "attack_success": metrics.accuracy(attack_pred, setup_.attack.labels),
            "group_accuracy": metrics.accuracy(fixed_pred, scenario.corrected.labels),
            "fidelity_test": metrics.fidelity(test_pred, reference["test"]),
            "fidelity_group": metrics.fidelity(group_pred, reference["group"]),
            "mia_auc": metrics.membership_inference_auc(member_losses, outsider_losses),
            "relearn_steps": relearn.steps if relearn.reached else None,
        }
        if canary is not None:  # the attack is extraction of the secret; accuracies are per character
            secret = canary(params)
            scores["exposure"] = secret["exposure"]
            scores["attack_success"] = secret["digits_extracted"] / secret["secret_digits"]
            scores["bits_per_char"] = text.bits_per_character(float(np.mean(test_losses)))
        return scores

    rows = []
    for name, model in (("poisoned", poisoned), ("retrained", retrained)):
        rows.append(
            {
                "method": name,
                "selection": None,
                "update": None,
                "fraction": 0.0 if name == "poisoned" else 1.0,
                "seconds": None,
                "gradient_equivalents": None,
                **score(model.params, model.batch_stats),
            }
        )
    gradient_seconds = curvature_record["gradient_seconds"]
    for selection_name, update in methods(config):
        name = _method_name(selection_name, update)
        entry = unlearn_record["methods"][name]
        params = _arrays(store, entry, poisoned.params)["params"]
        seconds = entry["seconds"] + _selection_cost(selection_name, update, curvature_record, select_record)
        mask_record = select_record["masks"][selection_name]
        diagnostics = entry["diagnostics"]
        rows.append(
            {
                "method": name,
                "selection": selection_name,
                "update": update,
                "fraction": mask_record["fraction"],
                "top_k_recall": mask_record["top_k_recall"],
                "seconds": seconds,
                "gradient_equivalents": seconds / gradient_seconds,
                "update_norm": diagnostics.get("update_norm"),
                "converged": diagnostics.get("converged"),
                "residual": diagnostics.get("residual"),
                "curvature_share": diagnostics.get("curvature_share"),
                "hyperparameters": entry["hyperparameters"],
                **({"data": entry["data"], "samples_seen": entry["samples_seen"]} if "data" in entry else {}),
                **score(params, poisoned.batch_stats),  # no update moves the batch-norm statistics
            }
        )
        log(f"evaluate: {name}")
    clean_accuracy, poisoned_accuracy = rows[1]["test_accuracy"], rows[0]["test_accuracy"]
    for row in rows:
        restored = metrics.accuracy_restored(row["test_accuracy"], poisoned_accuracy, clean_accuracy)
        # nan: poisoning cost no accuracy. A canary costs none by design (a few windows of text), so the ratio of
        # two differences of a few characters would only amplify noise.
        missing = np.isnan(restored) or setup_.canary is not None
        row["accuracy_restored"] = None if missing else restored
    record = {"rows": rows, "relearn_threshold": poisoned_fit}
    if config.forgetting:
        columns, record["forgetting"] = _score_families(store, setup_, config, log)
        for row in rows:
            row.update(columns[row["method"]])
    return record, {}


# ----------------------------------------------------------------------------------------------------------------
# The forgetting score (--forgetting K): families of K models along a leading model axis (jaxforget.ensembles),
# trained, estimated, selected, unlearned and scored together by the stages above, each vmapped over the models.
#
# Three families, each model with its own initialization and batch order: K poisoned models (every method unlearns
# each of them), K retrained references, and K more retrained models scored against the references as if they were
# an unlearned family: the score of perfect unlearning at this K (with finitely many models the threshold attacks find
# spurious separation, so it is below 1 and the only fair yardstick).

_FAMILIES = {"poisoned": "train", "retrained": "clean", "baseline": "clean"}  # family: its training set
_FAMILY_ROWS = 2048  # models x samples per forward pass when a family is evaluated
_FAMILY_TIMING_BUDGET = 5.0  # seconds: a family update slower than this is run (and timed) once, not twice


def _family_seeds(config: RunConfig, family: str) -> list[int]:
    """The seeds (initialization and batch order) of a family's K models: distinct across families and --seed."""
    base = (config.seed + 1) * len(_FAMILIES) * MAX_FAMILY + list(_FAMILIES).index(family) * MAX_FAMILY
    return [base + k for k in range(config.forgetting)]


def _sequential_models(config: RunConfig) -> bool:
    """Whether to loop over the models instead of vmapping them: XLA's CPU backend runs vmapped convolutions with
    per-model kernels several times slower than one at a time (benchmarks/ensembles.py)."""
    return config.model != "mlp" and jax.default_backend() == "cpu"


def _models_mesh(config: RunConfig, num_models: int):
    """A ``"models"`` mesh over the first :func:`device_count` devices when there are several and they divide the
    number of models, else ``None``."""
    count = device_count(config)
    return ensembles.models_mesh(jax.devices()[:count]) if count > 1 and num_models % count == 0 else None


def _family_logits(setup_: Setup, config: RunConfig) -> Callable:
    """``logits(params [K, ...], stats [K, ...], inputs [n, ...]) -> [K, n, classes]``, jitted."""

    def one(params, stats, inputs):
        return models.logits_fn_for(setup_.model, stats)(params, inputs)

    return ensembles.map_models(one, (0, 0, None), sequential=_sequential_models(config))


def _family_outputs(logits: Callable, variables: dict, batch: models.Batch) -> np.ndarray:
    """The logits [K, n, classes] of every model on ``batch``, in chunks that keep K x chunk under _FAMILY_ROWS."""
    size = max(1, _FAMILY_ROWS // ensembles.num_models(variables["params"]))
    parts = [
        np.asarray(logits(variables["params"], variables["batch_stats"], batch.inputs[i : i + size]))
        for i in range(0, len(batch.labels), size)
    ]
    return np.concatenate(parts, axis=1)


def _family_accuracy(logits: Callable, variables: dict, batch: models.Batch) -> np.ndarray:
    """Each model's accuracy [K] on ``batch``."""
    predicted = _family_outputs(logits, variables, batch).argmax(-1)
    return (predicted == np.asarray(batch.labels)[None]).mean(axis=1)


def train_family(
    setup_: Setup, config: RunConfig, training_set: models.Batch, seeds: list[int]
) -> tuple[dict[str, PyTree], dict[str, np.ndarray]]:
    """``len(seeds)`` models of ``config``'s architecture trained together on ``training_set``, model k from seed
    ``seeds[k]`` (its initialization and batch order) with the train stage's steps, batch size and learning rate;
    the model axis sharded over every device when they divide it.

    Returns:
      ``({"params", "batch_stats"} stacked [K, ...], history)``: the loss and accuracy of each step, [steps, K].
    """
    init = jax.jit(ensembles.create_stacked_states, static_argnums=(0, 2, 3))
    step = jax.jit(functools.partial(ensembles.indexed_train_step, unrolled=_sequential_models(config)))
    state = init(setup_.model, ensembles.keys_for_seeds(seeds), setup_.input_shape, training_optimizer(config))
    mesh = _models_mesh(config, len(seeds))
    state, history = ensembles.train_stacked(
        state, training_set, config.batch_size, seeds, step, num_steps=config.train_steps, mesh=mesh
    )
    return jax.block_until_ready({"params": state.params, "batch_stats": state.batch_stats}), history


def family_confidences(
    setup_: Setup, config: RunConfig, variables: dict[str, PyTree], batch: models.Batch
) -> np.ndarray:
    """The logit-scaled confidence [K, n] of each of ``batch``'s labels under each model of a stacked family."""
    return _confidences_of(_family_logits(setup_, config), variables, batch)


def _confidences_of(logits: Callable, variables: dict, batch: models.Batch) -> np.ndarray:
    return forgetting.logit_scaled_confidence(_family_outputs(logits, variables, batch), batch.labels)


def _train_families(store: Workdir, setup_: Setup, config: RunConfig, key: str, log: _Log) -> tuple[dict, dict]:
    """Trains (or reuses) the three families; their records and files."""
    record, files = {}, {}
    logits = _family_logits(setup_, config)
    for family, data_name in _FAMILIES.items():
        name = f"family-{family}"
        done = store.record(name, key)
        if done is None:
            seeds = _family_seeds(config, family)
            training_set = getattr(setup_.scenario, data_name)
            start = time.perf_counter()
            variables, history = train_family(setup_, config, training_set, seeds)
            seconds = time.perf_counter() - start
            accuracy = _family_accuracy(logits, variables, setup_.validation)
            arrays, digest = store.save_trees(name, key, {"variables": variables})
            entry = {
                "models": config.forgetting,
                "seeds": [seeds[0], seeds[-1]],
                "training_set": data_name,
                "seconds": seconds,
                "final_loss": float(np.mean(history["loss"][-1])),
                "validation_accuracy": float(accuracy.mean()),
                "validation_accuracy_range": [float(accuracy.min()), float(accuracy.max())],
                "arrays": arrays,
            }
            done = store.write_record(name, key, entry, files={arrays: digest})
            log(
                f"train: {config.forgetting} {family} models together in {seconds:.1f} s, validation accuracy "
                f"{accuracy.mean():.4f} (from {accuracy.min():.4f} to {accuracy.max():.4f})"
            )
        else:
            log(f"train: the {family} family already trained (reusing {store.path(name, key, '.npz')})")
        record[family] = done
        files.update(done["files"])
    return record, files


def _family_arrays(store: Workdir, record: dict, like: PyTree, config: RunConfig) -> dict[str, PyTree]:
    """The stacked arrays a family record describes (checked), with the model axis over every device that divides
    it, so that the jitted, vmapped stage functions run each device's models there."""
    arrays = _arrays(store, record, like)
    mesh = _models_mesh(config, config.forgetting)
    return arrays if mesh is None else ensembles.shard_models(arrays, mesh)


def _family(store: Workdir, setup_: Setup, config: RunConfig, family: str) -> dict[str, PyTree]:
    """``{"params", "batch_stats"}`` of a trained family, stacked, checked against the train stage's record."""
    entry = _require(store, "train", config)["families"][family]
    return _family_arrays(store, entry, _variables_like(setup_, config), config)["variables"]


def _family_curvature(
    store: Workdir, setup_: Setup, config: RunConfig, needed: list[str], chunks: list, log: _Log
) -> dict:
    """Every needed estimate for each poisoned model of the family, streamed like the single model's."""
    variables = _family(store, setup_, config, "poisoned")
    params, stats = variables["params"], variables["batch_stats"]
    scenario, count = setup_.scenario, config.forgetting
    estimators = _estimators(setup_.model, config.probes)
    sequential = _sequential_models(config)
    key = jax.random.key(config.seed)
    diagonals, seconds = {}, {}
    for name in needed:
        if name == "unlearning-gradient":
            fn = ensembles.map_models(estimators[name], (0, 0, None, None), sequential=sequential)
            pair = (scenario.poisoned_group, scenario.corrected)
            diagonals[name], seconds[name] = _median_seconds(fn, (params, stats, pair, key), 1)
        else:
            each = ensembles.map_models(estimators[name], (0, 0, None, 0), sequential=sequential)
            fn = lambda p, s, b, k, each=each: each(p, s, b, jax.random.split(k, count))  # noqa: E731
            batches = [scenario.poisoned_group] if name == "gradient" else chunks
            diagonals[name], seconds[name] = _stream(fn, params, stats, batches, key)
        log(f"curvature: {name} for the {count} poisoned models in {seconds[name]:.2f} s")
    arrays, digest = store.save_trees("family-curvature", stage_key(config, "curvature"), diagonals)
    return {"arrays": arrays, "files": {arrays: digest}, "seconds": seconds}


def _family_masks(
    store: Workdir, setup_: Setup, config: RunConfig, mask_of: Callable, curvature_record: dict, log: _Log
) -> dict:
    """Each selection rule's mask for each poisoned model of the family, from that model's own estimates."""
    like = _params_like(setup_, config)
    variables = _family(store, setup_, config, "poisoned")
    diagonals = _family_arrays(store, curvature_record["family"], like, config)
    keys = jax.random.split(jax.random.key(config.seed), config.forgetting)
    masks, seconds, selected = {}, {}, {}
    for name in config.selections:
        fn = jax.jit(jax.vmap(functools.partial(mask_of, name)))
        masks[name], seconds[name] = _median_seconds(fn, (diagonals, variables["params"], keys), 1)
        counts = [_tree_count(ensembles.unstack(masks[name], k)) for k in range(config.forgetting)]
        selected[name] = [min(counts), max(counts)]
    arrays, digest = store.save_trees("family-masks", stage_key(config, "select"), masks)
    log(f"select: {len(masks)} masks for each of the {config.forgetting} poisoned models")
    return {"arrays": arrays, "files": {arrays: digest}, "seconds": seconds, "selected": selected}


def _family_unlearn(store: Workdir, setup_: Setup, config: RunConfig, updates: Updates, log: _Log) -> tuple[dict, dict]:
    """Every method on each poisoned model of the family (one record per method, so a rerun keeps finished ones)."""
    like = _params_like(setup_, config)
    variables = _family(store, setup_, config, "poisoned")
    masks = _family_arrays(store, _require(store, "select", config)["family"], like, config)
    hessian = _family_arrays(store, _require(store, "curvature", config)["family"], like, config)["hessian"]
    record, files = {}, {}
    for selection_name, update in methods(config):
        name = _method_name(selection_name, update)
        output = f"family-unlearned/{selection_name}--{update}"
        this_key = method_key(config, selection_name, update)
        entry = store.record(output, this_key, report_stale=False)
        if entry is None:
            values = hyperparameters(config, update, selection_name)
            run = updates.family_runner(update, variables, masks[selection_name], hessian, values)
            # A warm-up then one timed run, unless the warm-up alone takes longer than _FAMILY_TIMING_BUDGET: then
            # that one run is the time, its compilation (seconds at most, shared by the methods after it) included.
            times, warm_up, new_params = time_runs(run, (), repeats=1, budget_s=_FAMILY_TIMING_BUDGET)
            seconds = times[0] if times else warm_up
            arrays, digest = store.save_trees(output, this_key, {"params": new_params})
            finite = [all_finite(ensembles.unstack(new_params, k)) for k in range(config.forgetting)]
            entry = {
                "seconds": seconds,
                "compilation_included": not times,
                "hyperparameters": values,
                "finite": int(sum(finite)),
                "arrays": arrays,
            }
            entry = store.write_record(output, this_key, entry, files={arrays: digest})
            log(f"unlearn: {name:<42} {seconds:7.3f} s for {config.forgetting} models")
        files.update(entry["files"])
        record[name] = entry
    return record, files


def _forgetting_scores(config: RunConfig, confidences: np.ndarray, reference: np.ndarray, key) -> dict[str, Any]:
    """The forgetting score (with its bootstrap interval over models) and the LiRA attack of one family against
    the retrained references."""
    interval = forgetting.bootstrap_interval(
        forgetting.forgetting_score_from_confidences, confidences, reference, key, resamples=config.forgetting_resamples
    )
    lira = forgetting.lira_attack(confidences, reference)
    return {
        "forgetting_score": interval.estimate,
        "forgetting_interval": [interval.low, interval.high],
        "lira_auc": lira.auc,
        "lira_tpr_at_1_fpr": lira.tpr_at_fpr,
    }


_STAGE_FUNCTIONS = {
    "train": _stage_train,
    "curvature": _stage_curvature,
    "select": _stage_select,
    "unlearn": _stage_unlearn,
    "evaluate": _stage_evaluate,
}


def run_stage(
    stage: str, config: RunConfig, workdir: str | os.PathLike, *, quiet: bool = False, wait: bool = True
) -> dict:
    """Runs one stage for ``config`` in ``workdir`` (skipped if it already finished with these settings).

    The stages before it must have finished (:func:`run_stage` on each, in ``STAGES`` order; ``jaxforget run`` does
    that). The stage holds ``workdir``'s lock while it runs: another process on the same directory waits, or with
    ``wait=False`` fails with :class:`~jaxforget.workdir.WorkdirBusyError`. A finished stage whose record or files
    fail their checks is recomputed, with a one-line notice on standard error.

    Returns:
      The stage's record, also written to ``workdir/<stage>.<key>.json``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a stage; choose one of {', '.join(STAGES)}.")
    check_config(config)
    check_setup(config)  # bad data or sizes fail here, before anything is written
    log = _Log(quiet)
    store = Workdir(workdir, notice=log.notice)
    with store.lock(wait=wait):
        for before in STAGES[: STAGES.index(stage)]:
            _require(store, before, config)
        key = stage_key(config, stage)
        record = store.record(stage, key)
        if record is not None:
            log(f"{stage}: finished earlier with these settings (reusing {store.path(stage, key, '.json')})")
            return record
        start = time.perf_counter()
        record, files = _STAGE_FUNCTIONS[stage](store, config, log)
        record["stage_seconds"] = time.perf_counter() - start
        return store.write_record(stage, key, record, files=files, inputs=_previous(stage, config))


def _score_families(store: Workdir, setup_: Setup, config: RunConfig, log: _Log) -> tuple[dict[str, dict], dict]:
    """The forgetting columns of every row (``poisoned``: the poisoned family; ``retrained``: the baseline family;
    each method: its family of unlearned models), all against the retrained references, and what they rest on."""
    scenario, count = setup_.scenario, config.forgetting
    logits = _family_logits(setup_, config)
    group = scenario.poisoned_group  # Z with the labels trained on: what the unlearned models must not remember
    retained = _take(scenario.train, np.setdiff1d(np.arange(len(scenario.train.labels)), scenario.group))

    def measure(variables):
        confidences = _confidences_of(logits, variables, group)
        retain = _family_accuracy(logits, variables, retained).mean()
        test = _family_accuracy(logits, variables, setup_.test).mean()
        return confidences, float(retain), float(test)

    reference, reference_retain, reference_test = measure(_family(store, setup_, config, "retrained"))
    key = jax.random.key(config.seed)
    start = time.perf_counter()

    def columns(variables, index: int) -> dict:
        confidences, retain, test = measure(variables)
        scores = _forgetting_scores(config, confidences, reference, jax.random.fold_in(key, index))
        final = forgetting.final_score(scores["forgetting_score"], retain, reference_retain, test, reference_test)
        return {
            **scores,
            "final_score": final,
            "forget_confidence": float(np.median(confidences)),  # which way, and how far, from the references'
            "family_retain_accuracy": retain,
            "family_test_accuracy": test,
        }

    poisoned = _family(store, setup_, config, "poisoned")
    found = {"poisoned": columns(poisoned, 0), "retrained": columns(_family(store, setup_, config, "baseline"), 1)}
    like = _params_like(setup_, config)
    family_methods = _require(store, "unlearn", config)["family"]
    for index, (selection_name, update) in enumerate(methods(config), start=2):
        name = _method_name(selection_name, update)
        entry = family_methods[name]
        cost = {"family_seconds_per_model": entry["seconds"] / count}
        if entry["finite"] < count:  # a diverged model has no confidence to score
            found[name] = {**cost, "forgetting_score": None, "final_score": None, "lira_auc": None}
            log.notice(f"evaluate: {name} left {count - entry['finite']} of {count} models non-finite; not scored")
            continue
        params = _family_arrays(store, entry, like, config)["params"]
        found[name] = {**cost, **columns({"params": params, "batch_stats": poisoned["batch_stats"]}, index)}
    seconds = time.perf_counter() - start
    log(f"evaluate: forgetting scores of {len(found)} families of {count} models in {seconds:.1f} s")
    summary = {
        "models": count,
        "reference": f"{count} models retrained on (D \\ Z) + Z~",
        "baseline": f"the retrained row: {count} more retrained models, scored as an unlearned family",
        "examples": int(scenario.size),
        "confidence": "logit-scaled confidence of the labels Z was trained with",
        "resamples": config.forgetting_resamples,
        # The devices the model axis was split over.
        "devices": 1 if _models_mesh(config, count) is None else device_count(config),
        "reference_forget_confidence": float(np.median(reference)),
        "reference_retain_accuracy": reference_retain,
        "reference_test_accuracy": reference_test,
    }
    return found, summary
