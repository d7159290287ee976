"""The main job, stage by stage: train, curvature, select, unlearn, evaluate.

Each stage reads what the previous ones wrote under ``workdir`` and writes its own results there atomically, with a
key of the settings it depends on. A rerun with the same settings skips every finished stage; a changed setting
reruns the stages that depend on it; a crash mid-stage loses nothing that was finished. The CLI
(:mod:`jaxforget.cli`) is a thin layer over :func:`run_stage`.

The comparison: at the same parameter budget, each selection rule (the paper's Hessian-largest and its baselines)
is combined with each unlearning update, and every result is scored against the poisoned model and the model
retrained without the poison.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxforget import checkpoint, curvature, data, metrics, models, scenarios, selection, train, unlearn
from jaxforget.atomic import open_atomic, write_json_atomic

__all__ = ["RunConfig", "SELECTIONS", "UPDATES", "STAGES", "run_stage", "check_config"]

PyTree = Any

# Selection rules. "hessian" is the exact Hessian diagonal: the exact GGN diagonal, equal to it for these networks.
SELECTIONS = (
    "hessian-largest",
    "hessian-smallest",
    "hutchinson-largest",
    "gnb-largest",
    "fisher-largest",
    "gradient-largest",
    "random",
    "last-layer",
    "all",
)
UPDATES = ("first-order", "diagonal-newton", "finetune", "cg")
STAGES = ("train", "curvature", "select", "unlearn", "evaluate")
MODELS = ("cnn", "mlp", "resnet18")
SCENARIOS = ("backdoor", "label-flip")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of the main job. Field docs double as the CLI's ``--help``."""

    dataset: str = "mnist5k"  # data set: embedded (mnist5k, digits) or tfds (mnist, fashion_mnist, cifar10)
    model: str = "cnn"  # cnn (the paper's), mlp or resnet18
    scenario: str = "label-flip"  # label-flip (label c -> c+1) or backdoor (a 3x3 trigger patch -> class 0)
    group_size: int = 200  # samples in the affected group Z
    budget: float = 0.01  # fraction of the parameters each selection rule may update
    selections: tuple[str, ...] = SELECTIONS  # selection rules to compare
    updates: tuple[str, ...] = ("first-order", "diagonal-newton", "finetune")  # unlearning updates (add cg)
    cg_selections: tuple[str, ...] = ("hessian-largest", "all")  # selections the (costly) CG update runs on
    seed: int = 0  # seed for the group, initialization, batches, probes and random masks
    train_steps: int = 500  # Adam steps for the poisoned and the retrained model
    batch_size: int = 64  # training batch size
    learning_rate: float = 1e-3  # Adam learning rate for training
    curvature_samples: int = 256  # training samples the curvature is estimated on
    probes: int = 16  # Hutchinson probes
    tau: float = 3e-4  # first-order step size (on the sum over the group)
    damping: float = 1.0  # damping of the mean-loss Hessian for diagonal Newton and CG
    finetune_steps: int = 30  # steps of masked fine-tuning on Z~ (with retained data)
    finetune_lr: float = 1e-3  # Adam learning rate for masked fine-tuning
    cg_iterations: int = 10  # CG iteration cap
    hessian_samples: int = 256  # training samples per Hessian-vector product in CG
    relearn_steps: int = 20  # cap on the fine-tuning steps on Z in the relearning test
    data_dir: str | None = None  # tfds data directory
    download: bool = False  # let tfds download missing data


# The settings each stage depends on (beyond those of the stages before it).
_STAGE_FIELDS = {
    "train": ("dataset", "model", "scenario", "group_size", "seed", "train_steps", "batch_size", "learning_rate"),
    "curvature": ("curvature_samples", "probes"),
    "select": ("budget", "selections"),
    "unlearn": (
        "updates",
        "cg_selections",
        "tau",
        "damping",
        "finetune_steps",
        "finetune_lr",
        "cg_iterations",
        "hessian_samples",
    ),
    "evaluate": ("relearn_steps",),
}


def check_config(config: RunConfig) -> None:
    """Raises ``ValueError`` naming the option and the fix for any bad setting, before anything is computed."""

    def fail(option: str, message: str) -> None:
        raise ValueError(f"--{option.replace('_', '-')}: {message}")

    names = data.EMBEDDED_DATASETS + data.TFDS_DATASETS
    if config.dataset not in names:
        fail("dataset", f"{config.dataset!r} is not a data set; choose one of {', '.join(names)}.")
    if config.model not in MODELS:
        fail("model", f"{config.model!r} is not a model; choose one of {', '.join(MODELS)}.")
    if config.scenario not in SCENARIOS:
        fail("scenario", f"{config.scenario!r} is not a scenario; choose one of {', '.join(SCENARIOS)}.")
    if not 0 < config.budget <= 1:
        fail("budget", f"{config.budget} must be a fraction of the parameters in (0, 1], e.g. 0.01.")
    for option, chosen, allowed in (
        ("selections", config.selections, SELECTIONS),
        ("cg_selections", config.cg_selections, SELECTIONS),
        ("updates", config.updates, UPDATES),
    ):
        unknown = [name for name in chosen if name not in allowed]
        if unknown or (option != "cg_selections" and not chosen):
            fail(option, f"{', '.join(unknown) or 'nothing'} chosen; choose from {', '.join(allowed)}.")
    for option in (
        "group_size",
        "train_steps",
        "batch_size",
        "curvature_samples",
        "probes",
        "finetune_steps",
        "cg_iterations",
        "hessian_samples",
        "relearn_steps",
    ):
        if getattr(config, option) < 1:
            fail(option, f"{getattr(config, option)} must be at least 1.")
    if config.seed < 0:
        fail("seed", f"{config.seed} must be non-negative.")
    for option in ("tau", "damping", "learning_rate", "finetune_lr"):
        if not getattr(config, option) > 0:
            fail(option, f"{getattr(config, option)} must be positive.")


def _stage_key(config: RunConfig, stage: str) -> str:
    fields = {}
    for name in STAGES[: STAGES.index(stage) + 1]:
        fields.update({field: getattr(config, field) for field in _STAGE_FIELDS[name]})
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Files: stage records, and pytrees of arrays as .npz, all written atomically.


def _record_path(workdir: pathlib.Path, stage: str) -> pathlib.Path:
    return workdir / f"{stage}.json"


def _current_record(path: pathlib.Path, key: str) -> dict | None:
    """The JSON record at ``path`` if it exists and was written for ``key`` (the same settings), else None."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None


def _finished(workdir: pathlib.Path, stage: str, config: RunConfig) -> dict | None:
    return _current_record(_record_path(workdir, stage), _stage_key(config, stage))


def _require(workdir: pathlib.Path, stage: str, config: RunConfig) -> dict:
    record = _finished(workdir, stage, config)
    if record is None:
        raise FileNotFoundError(
            f"stage {stage!r} has not finished in {workdir} for these settings; run `jaxforget {stage}` (or "
            f"`jaxforget run`) with the same options first."
        )
    return record


def _save_trees(path: pathlib.Path, trees: dict[str, PyTree]) -> None:
    arrays = {}
    for name, tree in trees.items():
        for index, leaf in enumerate(jax.tree.leaves(tree)):
            arrays[f"{name}/{index}"] = np.asarray(leaf)
    with open_atomic(path, "wb") as stream:
        np.savez(stream, **arrays)


def _load_trees(path: pathlib.Path, like: PyTree) -> dict[str, PyTree]:
    treedef = jax.tree.structure(like)
    with np.load(path) as stored:
        names = sorted({key.split("/")[0] for key in stored.files})
        return {
            name: jax.tree.unflatten(treedef, [stored[f"{name}/{i}"] for i in range(treedef.num_leaves)])
            for name in names
        }


# ----------------------------------------------------------------------------------------------------------------
# Data, model and the functions every stage jits.


@dataclasses.dataclass(frozen=True)
class _Setup:
    scenario: scenarios.Scenario
    test: models.Batch
    twin: models.Batch  # held-out samples poisoned like Z (attack success, membership non-members, relearning)
    model: Any
    input_shape: tuple[int, ...]


@functools.lru_cache(maxsize=4)
def _setup(config: RunConfig) -> _Setup:
    train_data = data.load(config.dataset, "train", data_dir=config.data_dir, download=config.download)
    test = data.load(config.dataset, "test", data_dir=config.data_dir, download=config.download)
    num_classes = int(max(train_data.labels.max(), test.labels.max())) + 1
    if config.scenario == "backdoor":
        scenario = scenarios.backdoor(train_data, config.group_size, config.seed, target_class=0)
    else:
        scenario = scenarios.label_flip(train_data, config.group_size, config.seed, num_classes=num_classes)
    model = {
        "cnn": lambda: models.CNN(num_classes=num_classes),
        "mlp": lambda: models.MLP(num_classes=num_classes, hidden=(256,), activation="relu"),
        "resnet18": lambda: models.ResNet18(num_classes=num_classes),
    }[config.model]()
    twin = scenarios.poison_like(test, scenario, seed=config.seed)
    return _Setup(scenario, test, twin, model, (1, *train_data.inputs.shape[1:]))


def _new_state(setup: _Setup, config: RunConfig, tx) -> train.TrainState:
    init = jax.jit(lambda key: train.create_train_state(setup.model, key, setup.input_shape, tx))
    return init(jax.random.key(config.seed))


def _restore(workdir: pathlib.Path, name: str, setup: _Setup, config: RunConfig) -> train.TrainState:
    state, _, _ = checkpoint.restore_checkpoint(
        workdir / name, _new_state(setup, config, optax.adam(config.learning_rate))
    )
    return state


def _subset(batch: models.Batch, size: int, seed: int) -> models.Batch:
    index = np.sort(np.random.default_rng(seed).choice(len(batch.labels), min(size, len(batch.labels)), replace=False))
    return models.Batch(batch.inputs[index], batch.labels[index])


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


def _timed(fn: Callable, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: train the poisoned model and the retrained reference (same initialization and batch order).


def _stage_train(workdir: pathlib.Path, config: RunConfig, log: _Log) -> dict:
    setup = _setup(config)
    step, evaluate_step = jax.jit(train.train_step), jax.jit(train.eval_step)
    key = _stage_key(config, "train")
    record = {"key": key, "models": {}}
    for name, training_set in (("poisoned", setup.scenario.train), ("retrained", setup.scenario.clean)):
        model_record = workdir / f"train-{name}.json"
        done = _current_record(model_record, key)
        if done is not None:
            record["models"][name] = done
            log(f"train: {name} model already trained (reusing {workdir / name})")
            continue
        state = _new_state(setup, config, optax.adam(config.learning_rate))
        epochs = -(-config.train_steps // (len(training_set.labels) // config.batch_size))  # full batches only
        stream = data.batches(training_set, config.batch_size, seed=config.seed, epochs=epochs)
        start = time.perf_counter()
        state, history = train.fit(
            state, stream, step, num_steps=config.train_steps, progress=not log.quiet, description=f"train {name}"
        )
        seconds = time.perf_counter() - start
        accuracy = train.evaluate(state, setup.test, evaluate_step)["accuracy"]
        checkpoint.save_checkpoint(
            workdir / name, state, metadata={"stage_key": key, "config": dataclasses.asdict(config), "model": name}
        )
        entry = {"key": key, "seconds": seconds, "final_loss": float(history["loss"][-1]), "test_accuracy": accuracy}
        write_json_atomic(model_record, entry)
        record["models"][name] = entry
        log(f"train: {name} model, test accuracy {accuracy:.4f} after {config.train_steps} steps ({seconds:.1f} s)")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: curvature estimates at the poisoned parameters.

_ESTIMATOR_OF = {
    "hessian-largest": "hessian",
    "hessian-smallest": "hessian",
    "hutchinson-largest": "hutchinson",
    "gnb-largest": "gnb",
    "fisher-largest": "fisher",
    "gradient-largest": "gradient",
}


def _estimators(model, probes: int) -> dict[str, Callable]:
    """Jitted ``estimator(params, batch_stats, batch, key) -> diagonal``, each on the mean loss over ``batch``."""

    def hessian(params, stats, batch, key):
        del key
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

    named = {"hessian": hessian, "hutchinson": hutchinson, "gnb": gnb, "fisher": fisher, "gradient": gradient}
    return {name: jax.jit(fn) for name, fn in named.items()}


def _chunks(batch: models.Batch, size: int) -> list[models.Batch]:
    """Consecutive batches of ``min(size, n)`` rows, in order (a remainder is dropped)."""
    return list(data.batches(batch, min(size, len(batch.labels)), seed=0, shuffle=False))


def _stage_curvature(workdir: pathlib.Path, config: RunConfig, log: _Log) -> dict:
    setup = _setup(config)
    state = _restore(workdir, "poisoned", setup, config)
    params, stats = state.params, state.batch_stats
    sample = _subset(setup.scenario.train, config.curvature_samples, config.seed)
    chunks = _chunks(sample, 64)
    needed = ["hessian"] + sorted({_ESTIMATOR_OF[s] for s in config.selections if s in _ESTIMATOR_OF} - {"hessian"})
    estimators = _estimators(setup.model, config.probes)
    diagonals, seconds = {}, {}
    for name in needed:
        fn = estimators[name]
        batches = [setup.scenario.poisoned_group] if name == "gradient" else chunks
        jax.block_until_ready(fn(params, stats, batches[0], jax.random.key(config.seed)))  # compile
        start = time.perf_counter()
        diagonals[name] = curvature.accumulate_diagonal(
            lambda batch, key, fn=fn: fn(params, stats, batch, key), batches, jax.random.key(config.seed)
        )
        jax.block_until_ready(diagonals[name])
        seconds[name] = time.perf_counter() - start
        log(f"curvature: {name} diagonal on {sum(len(b.labels) for b in batches)} samples in {seconds[name]:.2f} s")

    grad = jax.jit(jax.grad(lambda p, s, b: models.loss_fn_for(setup.model, s)(p, b)))
    batch = models.Batch(sample.inputs[: config.batch_size], sample.labels[: config.batch_size])
    jax.block_until_ready(grad(params, stats, batch))
    gradient_seconds = float(np.median([_timed(grad, params, stats, batch)[1] for _ in range(5)]))

    recall = {
        name: float(metrics.top_k_recall(diagonals[name], diagonals["hessian"], config.budget))
        for name in diagonals
        if name != "gradient"
    }
    _save_trees(workdir / "curvature.npz", diagonals)
    record = {
        "key": _stage_key(config, "curvature"),
        "samples": len(sample.labels),
        "seconds": seconds,
        "gradient_seconds": gradient_seconds,
        "gradient_batch": int(len(batch.labels)),
        "top_k_recall": recall,
    }
    log(f"curvature: one gradient on {len(batch.labels)} samples takes {1e3 * gradient_seconds:.1f} ms")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: masks at the budget.


def _stage_select(workdir: pathlib.Path, config: RunConfig, log: _Log) -> dict:
    setup = _setup(config)
    state = _restore(workdir, "poisoned", setup, config)
    params = state.params
    diagonals = _load_trees(workdir / "curvature.npz", params)
    masks, seconds = {}, {}
    top = jax.jit(selection.select_top, static_argnames=("fraction", "largest"))
    random_top = jax.jit(selection.select_random, static_argnames="fraction")

    def make_mask(name):
        if name in _ESTIMATOR_OF:
            largest = not name.endswith("smallest")
            return top(diagonals[_ESTIMATOR_OF[name]], fraction=config.budget, largest=largest)
        if name == "random":
            return random_top(params, fraction=config.budget, key=jax.random.key(config.seed))
        if name == "last-layer":
            logits_fn = models.logits_fn_for(setup.model, state.batch_stats)
            layer = selection.last_layer(logits_fn, params, jnp.zeros(setup.input_shape, jnp.float32))
            return selection.select_layers(params, layer)
        return jax.tree.map(lambda p: np.ones(p.shape, bool), params)

    for name in config.selections:
        jax.block_until_ready(make_mask(name))  # compiles; the second call is timed
        masks[name], seconds[name] = _timed(make_mask, name)
    _save_trees(workdir / "masks.npz", masks)
    total = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    reference = masks.get("hessian-largest")

    def overlap(mask):
        if reference is None:
            return None
        both = sum(
            int(np.sum(np.asarray(a) & np.asarray(b)))
            for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(reference), strict=True)
        )
        return both / max(1, sum(int(np.sum(r)) for r in jax.tree.leaves(reference)))

    summary = {
        name: {
            "selected": int(sum(int(np.sum(m)) for m in jax.tree.leaves(mask))),
            "fraction": sum(int(np.sum(m)) for m in jax.tree.leaves(mask)) / total,
            "overlap_with_hessian_largest": overlap(mask),
            "seconds": seconds[name],
        }
        for name, mask in masks.items()
    }
    log(f"select: {len(masks)} masks over {total:,} parameters at budget {config.budget:g}")
    return {"key": _stage_key(config, "select"), "num_params": total, "masks": summary}


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: every (selection, update) pair from the poisoned parameters.


def _method_name(selection_name: str, update: str) -> str:
    return f"{selection_name}/{update}"


def _methods(config: RunConfig) -> list[tuple[str, str]]:
    pairs = []
    for update in config.updates:
        names = [s for s in config.selections if update != "cg" or s in config.cg_selections]
        pairs += [(s, update) for s in names]
    return pairs


def _scalars_to_python(tree: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in tree.items()}


def _update_functions(setup: _Setup, config: RunConfig, num_train: int) -> dict[str, Callable]:
    model = setup.model

    def first_order(params, stats, old, new, mask, curvature_diag, hessian_batches):
        del curvature_diag, hessian_batches
        return unlearn.first_order_update(models.loss_fn_for(model, stats), params, old, new, tau=config.tau, mask=mask)

    def diagonal_newton(params, stats, old, new, mask, curvature_diag, hessian_batches):
        del hessian_batches
        return unlearn.diagonal_newton_update(
            models.loss_fn_for(model, stats),
            params,
            old,
            new,
            curvature_diag,
            num_train=num_train,
            mask=mask,
            damping=config.damping,
        )

    def cg(params, stats, old, new, mask, curvature_diag, hessian_batches):
        del curvature_diag
        return unlearn.second_order_update(
            models.loss_fn_for(model, stats),
            params,
            old,
            new,
            hessian_batches,
            num_train=num_train,
            mask=mask,
            damping=config.damping,
            max_iterations=config.cg_iterations,
            tol=1e-3,
        )

    return {"first-order": jax.jit(first_order), "diagonal-newton": jax.jit(diagonal_newton), "cg": jax.jit(cg)}


# The settings each update depends on, so that adding an update or a selection keeps the finished ones.
_UPDATE_FIELDS = {
    "first-order": ("tau",),
    "diagonal-newton": ("damping",),
    "finetune": ("finetune_steps", "finetune_lr", "batch_size"),
    "cg": ("damping", "cg_iterations", "hessian_samples"),
}


def _method_key(config: RunConfig, update: str) -> str:
    fields = {field: getattr(config, field) for field in _UPDATE_FIELDS[update]}
    text = json.dumps([_stage_key(config, "select"), update, fields], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stage_unlearn(workdir: pathlib.Path, config: RunConfig, log: _Log) -> dict:
    setup = _setup(config)
    state = _restore(workdir, "poisoned", setup, config)
    params, stats = state.params, state.batch_stats
    masks = _load_trees(workdir / "masks.npz", params)
    hessian = _load_trees(workdir / "curvature.npz", params)["hessian"]
    scenario = setup.scenario
    old, new = scenario.poisoned_group, scenario.corrected
    num_train = len(scenario.train.labels)
    functions = _update_functions(setup, config, num_train)
    batch = min(config.batch_size, scenario.size)
    hessian_sample = _subset(scenario.train, config.hessian_samples, config.seed + 1)
    hessian_batches = unlearn.stack_batches(_chunks(hessian_sample, 64))
    retained = np.setdiff1d(np.arange(num_train), scenario.group)
    retain_data = models.Batch(scenario.train.inputs[retained], scenario.train.labels[retained])
    retain_batches = list(data.batches(retain_data, batch, seed=config.seed, epochs=1))[: config.finetune_steps]
    new_batches = _chunks(new, batch)
    finetune_tx = optax.adam(config.finetune_lr)  # one object, so one compiled step serves every mask
    key = _stage_key(config, "unlearn")
    (workdir / "unlearned").mkdir(exist_ok=True)
    compiled, record = set(), {"key": key, "methods": {}}
    for selection_name, update in _methods(config):
        name = _method_name(selection_name, update)
        path = workdir / "unlearned" / f"{selection_name}--{update}"
        method_key = _method_key(config, update)
        done = _current_record(path.with_suffix(".json"), method_key)
        if done is not None:
            record["methods"][name] = done
            continue
        mask = masks[selection_name]
        if update == "finetune":
            run = lambda steps, mask=mask: unlearn.finetune_unlearn(  # noqa: E731
                state, new_batches, retain_batches, tx=finetune_tx, mask=mask, steps=steps
            )
            if update not in compiled:
                jax.block_until_ready(run(1)[0].params)
            start = time.perf_counter()
            final, info = run(config.finetune_steps)
            new_params = jax.block_until_ready(final.params)
            info = {k: v for k, v in info.items() if k != "loss"}
        else:
            args = (params, stats, old, new, mask, hessian, hessian_batches)
            if update not in compiled:
                jax.block_until_ready(functions[update](*args))
            start = time.perf_counter()
            new_params, info = jax.block_until_ready(functions[update](*args))
        seconds = time.perf_counter() - start
        compiled.add(update)
        _save_trees(path.with_suffix(".npz"), {"params": new_params})
        entry = {
            "key": method_key,
            "seconds": seconds,
            "diagnostics": _scalars_to_python({k: np.asarray(v) for k, v in info.items()}),
        }
        write_json_atomic(path.with_suffix(".json"), entry)
        record["methods"][name] = entry
        log(f"unlearn: {name:<34} {seconds:7.3f} s")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Stage 5: score every model against the poisoned one and the retrained reference.


def _predictions(setup: _Setup, config: RunConfig):
    """Jitted ``(params, stats, inputs, labels) -> (predicted classes, per-sample losses)``."""

    @jax.jit
    def predict(params, stats, inputs, labels):
        logits = models.logits_fn_for(setup.model, stats)(params, inputs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.argmax(logits, -1), losses

    def run(params, stats, batch: models.Batch, size: int = 500):
        outputs = [
            predict(params, stats, batch.inputs[i : i + size], batch.labels[i : i + size])
            for i in range(0, len(batch.labels), size)
        ]
        return np.concatenate([np.asarray(o[0]) for o in outputs]), np.concatenate([np.asarray(o[1]) for o in outputs])

    return run


def _stage_evaluate(workdir: pathlib.Path, config: RunConfig, log: _Log) -> dict:
    setup = _setup(config)
    scenario = setup.scenario
    poisoned = _restore(workdir, "poisoned", setup, config)
    retrained = _restore(workdir, "retrained", setup, config)
    curvature_record = _require(workdir, "curvature", config)
    select_record = _require(workdir, "select", config)
    unlearn_record = _require(workdir, "unlearn", config)
    predict = _predictions(setup, config)
    twin_probe = _subset(setup.twin, 256, config.seed)
    non_members = _subset(setup.twin, scenario.size, config.seed + 2)
    group_batches = _chunks(scenario.poisoned_group, config.batch_size)
    relearn_step = jax.jit(train.train_step)
    reference = {
        "test": predict(retrained.params, retrained.batch_stats, setup.test)[0],
        "group": predict(retrained.params, retrained.batch_stats, scenario.poisoned_group)[0],
    }

    def score(params) -> dict:
        stats = poisoned.batch_stats
        test_pred, _ = predict(params, stats, setup.test)
        twin_pred, _ = predict(params, stats, setup.twin)
        fixed_pred, _ = predict(params, stats, scenario.corrected)
        group_pred, member_losses = predict(params, stats, scenario.poisoned_group)
        _, outsider_losses = predict(params, stats, non_members)
        state = poisoned.replace(params=params, opt_state=poisoned.tx.init(params))
        relearn = metrics.relearning_steps(
            relearn_step,
            state,
            group_batches,
            lambda s: metrics.accuracy(predict(s.params, stats, twin_probe)[0], twin_probe.labels),
            threshold=0.5,
            max_steps=config.relearn_steps,
        )
        return {
            "test_accuracy": metrics.accuracy(test_pred, setup.test.labels),
            "attack_success": metrics.accuracy(twin_pred, setup.twin.labels),
            "group_accuracy": metrics.accuracy(fixed_pred, scenario.corrected.labels),
            "fidelity_test": metrics.fidelity(test_pred, reference["test"]),
            "fidelity_group": metrics.fidelity(group_pred, reference["group"]),
            "mia_auc": metrics.membership_inference_auc(member_losses, outsider_losses),
            "relearn_steps": relearn.steps if relearn.reached else None,
        }

    rows = []
    baseline = {"poisoned": score(poisoned.params), "retrained": score(retrained.params)}
    for name, scores in baseline.items():
        rows.append(
            {
                "method": name,
                "selection": None,
                "update": None,
                "fraction": 0.0 if name == "poisoned" else 1.0,
                "seconds": None,
                "gradient_equivalents": None,
                **scores,
            }
        )
    gradient_seconds = curvature_record["gradient_seconds"]
    for selection_name, update in _methods(config):
        name = _method_name(selection_name, update)
        params = _load_trees(workdir / "unlearned" / f"{selection_name}--{update}.npz", poisoned.params)["params"]
        entry = unlearn_record["methods"][name]
        selection_seconds = curvature_record["seconds"].get(_ESTIMATOR_OF.get(selection_name, ""), 0.0)
        if update == "diagonal-newton":  # it uses the exact Hessian diagonal whatever the selection
            selection_seconds = max(selection_seconds, curvature_record["seconds"]["hessian"])
        seconds = entry["seconds"] + selection_seconds + select_record["masks"][selection_name]["seconds"]
        rows.append(
            {
                "method": name,
                "selection": selection_name,
                "update": update,
                "fraction": select_record["masks"][selection_name]["fraction"],
                "seconds": seconds,
                "gradient_equivalents": seconds / gradient_seconds,
                "converged": entry["diagnostics"].get("converged"),
                **score(params),
            }
        )
        log(f"evaluate: {name}")
    clean_accuracy, poisoned_accuracy = baseline["retrained"]["test_accuracy"], baseline["poisoned"]["test_accuracy"]
    for row in rows:
        restored = metrics.accuracy_restored(row["test_accuracy"], poisoned_accuracy, clean_accuracy)
        row["accuracy_restored"] = None if np.isnan(restored) else restored  # nan: poisoning cost no accuracy
    return {"key": _stage_key(config, "evaluate"), "rows": rows}


_STAGE_FUNCTIONS = {
    "train": _stage_train,
    "curvature": _stage_curvature,
    "select": _stage_select,
    "unlearn": _stage_unlearn,
    "evaluate": _stage_evaluate,
}


def run_stage(stage: str, config: RunConfig, workdir: str | os.PathLike, *, quiet: bool = False) -> dict:
    """Runs one stage for ``config`` in ``workdir`` (skipped if it already finished with these settings).

    The stages before it must have finished (:func:`run_stage` on each, in ``STAGES`` order; ``jaxforget run`` does
    that). Returns the stage's record, which is also written to ``workdir/<stage>.json``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a stage; choose one of {', '.join(STAGES)}.")
    check_config(config)
    workdir = pathlib.Path(workdir)
    for before in STAGES[: STAGES.index(stage)]:
        _require(workdir, before, config)
    log = _Log(quiet)
    record = _finished(workdir, stage, config)
    if record is not None:
        log(f"{stage}: finished earlier with these settings (reusing {_record_path(workdir, stage)})")
        return record
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    record = _STAGE_FUNCTIONS[stage](workdir, config, log)
    record["stage_seconds"] = time.perf_counter() - start
    write_json_atomic(_record_path(workdir, stage), record)
    return record
