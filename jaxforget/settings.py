"""The main job's settings: :class:`RunConfig`, its checks, the hyperparameters each method runs with, and which
stage depends on which setting.

The unlearning hyperparameters (τ per selection rule, diagonal-Newton damping per selection rule, fine-tuning
learning rate and steps, CG damping) default to the values that ``experiments/tune.py`` chose on validation data
and tuning seeds (written to ``jaxforget/tuned.json``); a value given in the ``RunConfig`` overrides them for every
rule. Nothing here imports the stage runner, so the CLI, the stages and the experiment scripts can all import it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
from typing import Any

from jaxforget import data

__all__ = [
    "RunConfig",
    "SELECTIONS",
    "UPDATES",
    "FINETUNE_UPDATES",
    "STAGES",
    "MODELS",
    "SCENARIOS",
    "TEXT_DATASETS",
    "CANARY_FIELDS",
    "FORGETTING_FIELDS",
    "RECIPE_FIELDS",
    "ESTIMATOR_OF",
    "check_config",
    "scenario_name",
    "hyperparameters",
    "tuned_values",
    "methods",
    "stage_key",
    "curvature_estimators",
    "method_key",
    "stage_options",
]

# Selection rules. "hessian" is the exact Hessian diagonal: the exact GGN diagonal, equal to it for these networks.
SELECTIONS = (
    "hessian-largest",
    "hessian-smallest",
    "hessian-smallest-nonzero",
    "hutchinson-largest",
    "gnb-largest",
    "fisher-largest",
    "gradient-largest",
    "unlearning-gradient-largest",
    "random",
    "last-layer",
    "last-layers",
    "all",
)
# The curvature or saliency each selection rule ranks by (rules absent here need none).
ESTIMATOR_OF = {
    "hessian-largest": "hessian",
    "hessian-smallest": "hessian",
    "hessian-smallest-nonzero": "hessian",
    "last-layers": "hessian",
    "hutchinson-largest": "hutchinson",
    "gnb-largest": "gnb",
    "fisher-largest": "fisher",
    "gradient-largest": "gradient",
    "unlearning-gradient-largest": "unlearning-gradient",
}
# Fine-tuning variants: the data each one trains on (Z~: the corrected group; retained: D without Z; Z: ascent).
FINETUNE_UPDATES = {
    "finetune": "Z~ + retained",
    "finetune-corrected": "Z~ only",
    "finetune-ascent": "Z~ + retained - ascent on Z",
}
UPDATES = ("first-order", "diagonal-newton", *FINETUNE_UPDATES, "cg")
STAGES = ("train", "curvature", "select", "unlearn", "evaluate")
MODELS = ("cnn", "mlp", "resnet18", "transformer")
SCENARIOS = ("backdoor", "label-flip", "canary")
TEXT_DATASETS = ("pydoc-topics", "tiny_shakespeare")
# Settings of the canary scenario only: part of a stage key only when the scenario is canary, so image runs keep
# their keys (and their workdirs) whatever these defaults are.
CANARY_FIELDS = ("text_characters", "context", "repetitions", "secret_length")
CORRECTIONS = ("relabel", "remove-trigger")
# Settings of the forgetting score only: part of a stage key only when --forgetting is on, so runs without it keep
# their keys (and their workdirs).
FORGETTING_FIELDS = ("forgetting", "forgetting_resamples")
# The training recipe beyond Adam at a constant rate (for the paper-scale ResNet), and the compute precision: part
# of the train key only when they differ from their defaults, so every earlier workdir keeps its keys.
RECIPE_FIELDS = ("optimizer", "weight_decay", "augment", "precision")
OPTIMIZERS = ("adam", "sgd")
AUGMENTATIONS = ("none", "crop-flip")
PRECISIONS = ("float32", "bfloat16")
MAX_FAMILY = 4096  # models per family; the family seeds leave room for this many


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of the main job. Field comments double as the CLI's ``--help``."""

    dataset: str = "mnist5k"  # data set: embedded (mnist5k, digits) or tfds (mnist, fashion_mnist, cifar10)
    model: str = "cnn"  # cnn (the paper's), mlp or resnet18
    width: int = 64  # resnet18's base width (64: the standard network; smaller for quick runs)
    scenario: str = "label-flip"  # label-flip (label c -> c+1) or backdoor (a 3x3 trigger patch -> class 0)
    correction: str = "relabel"  # backdoor's Z~: relabel (triggered images, true labels) or remove-trigger
    text_characters: int = 120_000  # canary: characters of the corpus used, from its start (0: all of it)
    context: int = 64  # canary: characters per training window of the language model
    repetitions: int = 8  # canary: times the secret is inserted into the training text
    secret_length: int = 4  # canary: digits of the secret (exposure exact by enumeration up to 6 digits)
    group_size: int = 200  # samples in the affected group Z
    validation_size: int = 500  # training samples set aside for tuning (never trained on, never reported)
    holdout_size: int = 500  # training samples set aside for the attack set and membership non-members
    budget: float = 0.01  # fraction of the parameters each selection rule may update
    selections: tuple[str, ...] = SELECTIONS  # selection rules to compare
    updates: tuple[str, ...] = ("first-order", "diagonal-newton", "finetune")  # unlearning updates
    cg_selections: tuple[str, ...] = ("hessian-largest", "all")  # selections the (costly) CG update runs on
    seed: int = 0  # seed for the group, initialization, batches, probes and random masks
    train_steps: int = 500  # training steps for the poisoned and the retrained model
    batch_size: int = 64  # training batch size
    learning_rate: float | None = None  # peak training learning rate (default: adam 1e-3, 3e-3 for the canary; sgd 0.1)
    optimizer: str = "adam"  # training optimizer: adam (constant rate) or sgd (Nesterov momentum 0.9, cosine decay)
    weight_decay: float = 0.0  # training weight decay (sgd: L2 added to the gradient; adam: decoupled, as AdamW)
    augment: str = "none"  # training augmentation: none, or crop-flip (4-pixel padded random crops, mirror flips)
    precision: str = "float32"  # compute dtype: float32, or bfloat16 (parameters, losses and curvature stay float32)
    curvature_samples: int = 0  # training samples the curvature is estimated on (0: the whole training set)
    probes: int = 2  # Hutchinson probes per batch of 64 samples
    tau: float | None = None  # first-order step size on the group's sum (default: tuned per selection rule)
    damping: float | None = None  # diagonal-Newton damping (default: tuned per selection rule)
    finetune_steps: int | None = None  # fine-tuning steps (default: tuned per fine-tuning variant)
    finetune_lr: float | None = None  # fine-tuning Adam learning rate (default: tuned per variant)
    ascent_weight: float | None = None  # weight of the ascent on Z in finetune-ascent (default: tuned)
    cg_damping: float | None = None  # damping of the mean-loss Hessian for CG (default: tuned)
    cg_iterations: int = 10  # CG iteration cap
    hessian_samples: int = 256  # training samples per Hessian-vector product in CG
    timing_repeats: int = 3  # timed runs per method after compilation; the table shows their median
    relearn_steps: int = 20  # cap on the fine-tuning steps on Z in the relearning test
    forgetting: int = 0  # K: also score forgetting against retrained models (K poisoned, 2K retrained; 0: off)
    forgetting_resamples: int = 10  # bootstrap resamples over models for each forgetting score's interval
    data_dir: str | None = None  # tfds data directory
    download: bool = False  # let tfds download missing data
    devices: int = 0  # devices to spread each batch (and each family of models) over (0: all); not a stage setting

    def __post_init__(self):
        # The canary scenario's own defaults for the data set and the model: text, and a language model.
        if self.scenario == "canary":
            if self.dataset == "mnist5k":
                object.__setattr__(self, "dataset", "pydoc-topics")
            if self.model == "cnn":
                object.__setattr__(self, "model", "transformer")
        if self.learning_rate is None:
            rate = 0.1 if self.optimizer == "sgd" else 3e-3 if self.scenario == "canary" else 1e-3
            object.__setattr__(self, "learning_rate", rate)


# The settings each stage depends on (beyond those of the stages before it).
STAGE_FIELDS = {
    "train": (
        "dataset",
        "model",
        "width",
        "scenario",
        "correction",
        *CANARY_FIELDS,
        "group_size",
        "validation_size",
        "holdout_size",
        "seed",
        "train_steps",
        "batch_size",
        "learning_rate",
        *RECIPE_FIELDS,
        "forgetting",
    ),
    "curvature": ("curvature_samples", "probes"),
    "select": ("budget", "selections", "timing_repeats"),
    "unlearn": ("updates", "cg_selections"),  # and every method's resolved hyperparameters (see stage_key)
    "evaluate": ("relearn_steps", "forgetting_resamples"),
}


# Settings that no stage key names but that decide where the data comes from, or the unlearning hyperparameters
# (part of every method's key through ``hyperparameters``).
_DATA_FIELDS = ("data_dir", "download", "devices")
_UPDATE_FIELDS = (
    "tau",
    "damping",
    "finetune_steps",
    "finetune_lr",
    "ascent_weight",
    "cg_damping",
    "cg_iterations",
    "hessian_samples",
)


def stage_options(stage: str) -> tuple[str, ...]:
    """The ``RunConfig`` fields that matter to ``stage``: those its key and the keys of the stages before it
    depend on (they name the outputs it reads and writes), and the data location."""
    names = []
    for before in STAGES[: STAGES.index(stage) + 1]:
        names += STAGE_FIELDS[before]
        if before == "unlearn":
            names += _UPDATE_FIELDS
    return tuple(f.name for f in dataclasses.fields(RunConfig) if f.name in {*names, *_DATA_FIELDS})


def _fail(option: str, message: str) -> None:
    raise ValueError(f"--{option.replace('_', '-')}: {message}")


def check_config(config: RunConfig) -> None:
    """Raises ``ValueError`` naming the option and the fix for any bad setting, before anything is computed."""
    names = data.EMBEDDED_DATASETS + data.TFDS_DATASETS + TEXT_DATASETS
    for option, allowed in (
        ("dataset", names),
        ("model", MODELS),
        ("scenario", SCENARIOS),
        ("correction", CORRECTIONS),
        ("optimizer", OPTIMIZERS),
        ("augment", AUGMENTATIONS),
        ("precision", PRECISIONS),
    ):
        if getattr(config, option) not in allowed:
            _fail(option, f"{getattr(config, option)!r} is not one of {', '.join(allowed)}.")
    text = config.scenario == "canary"
    if text != (config.dataset in TEXT_DATASETS):
        wanted = ", ".join(TEXT_DATASETS) if text else ", ".join(data.EMBEDDED_DATASETS + data.TFDS_DATASETS)
        _fail("dataset", f"{config.dataset!r} does not fit --scenario {config.scenario}; choose one of {wanted}.")
    if text != (config.model == "transformer"):
        wanted = "transformer" if text else "cnn, mlp or resnet18"
        _fail("model", f"{config.model!r} does not fit --scenario {config.scenario}; choose {wanted}.")
    if config.text_characters < 0:
        _fail("text_characters", f"{config.text_characters} must be 0 (the whole corpus) or a number of characters.")
    for option, low, high in (("context", 16, 1024), ("repetitions", 1, 1000), ("secret_length", 1, 16)):
        value = getattr(config, option)
        if not low <= value <= high:
            _fail(option, f"{value} must lie in [{low}, {high}].")
    if not 0 < config.budget <= 1:
        _fail("budget", f"{config.budget} must be a fraction of the parameters in (0, 1], e.g. 0.01.")
    for option, chosen, allowed in (
        ("selections", config.selections, SELECTIONS),
        ("cg_selections", config.cg_selections, SELECTIONS),
        ("updates", config.updates, UPDATES),
    ):
        unknown = [name for name in chosen if name not in allowed]
        if unknown or (option != "cg_selections" and not chosen):
            _fail(option, f"{', '.join(unknown) or 'nothing'} chosen; choose from {', '.join(allowed)}.")
    for option in (
        "group_size",
        "width",
        "validation_size",
        "holdout_size",
        "train_steps",
        "batch_size",
        "probes",
        "cg_iterations",
        "hessian_samples",
        "timing_repeats",
        "relearn_steps",
    ):
        if getattr(config, option) < 1:
            _fail(option, f"{getattr(config, option)} must be at least 1.")
    if config.width != RunConfig.width and config.model != "resnet18":
        _fail("width", f"{config.width} applies to --model resnet18 only; drop it or choose resnet18.")
    if config.curvature_samples < 0:
        _fail("curvature_samples", f"{config.curvature_samples} must be 0 (the whole training set) or positive.")
    if config.finetune_steps is not None and config.finetune_steps < 1:
        _fail("finetune_steps", f"{config.finetune_steps} must be at least 1.")
    if config.seed < 0:
        _fail("seed", f"{config.seed} must be non-negative.")
    for option in ("tau", "damping", "learning_rate", "finetune_lr", "cg_damping"):
        value = getattr(config, option)
        if value is not None and not (math.isfinite(value) and value > 0):
            _fail(option, f"{value} must be a positive, finite number.")
    if config.forgetting and not 3 <= config.forgetting <= MAX_FAMILY:
        _fail("forgetting", f"{config.forgetting} must be 0 (off) or a number of models in [3, {MAX_FAMILY}].")
    if config.forgetting and text:
        _fail("forgetting", "the forgetting score is built for the image scenarios; drop it for --scenario canary.")
    if config.forgetting_resamples < 2:
        _fail("forgetting_resamples", f"{config.forgetting_resamples} must be at least 2.")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        _fail("weight_decay", f"{config.weight_decay} must be a non-negative, finite number, e.g. 5e-4.")
    if config.augment != "none" and (text or config.forgetting):
        what = "--scenario canary" if text else "--forgetting (its families train on the device from indices)"
        _fail("augment", f"{config.augment} applies to a single image model; drop it for {what}.")
    if config.precision != "float32" and text:
        _fail("precision", f"{config.precision} is for the image models; drop it for --scenario canary.")
    if config.devices < 0:
        _fail("devices", f"{config.devices} must be 0 (every device) or a number of devices.")
    if config.ascent_weight is not None and not (math.isfinite(config.ascent_weight) and config.ascent_weight >= 0):
        _fail("ascent_weight", f"{config.ascent_weight} must be a non-negative, finite number.")


def scenario_name(config: RunConfig) -> str:
    """The scenario as the tuned values are keyed: ``"label-flip"``, ``"backdoor/relabel"``, ..."""
    return config.scenario if config.scenario != "backdoor" else f"backdoor/{config.correction}"


_TUNED_PATH = pathlib.Path(__file__).with_name("tuned.json")

# Used only where tuned.json has no value (a scenario or rule not tuned yet); a record says which source was used.
_FALLBACK = {
    "first-order": {"tau": 3e-4},
    "diagonal-newton": {"damping": 1.0},
    "finetune": {"finetune_lr": 1e-3, "finetune_steps": 30},
    "finetune-corrected": {"finetune_lr": 1e-3, "finetune_steps": 30},
    "finetune-ascent": {"finetune_lr": 1e-3, "finetune_steps": 30, "ascent_weight": 0.1},
    "cg": {"cg_damping": 1.0},
}


@functools.lru_cache(maxsize=1)
def tuned_values() -> dict[str, Any]:
    """The contents of ``jaxforget/tuned.json`` (written by ``experiments/tune.py``), or ``{}`` if it is absent."""
    if not _TUNED_PATH.exists():
        return {}
    return json.loads(_TUNED_PATH.read_text())


def hyperparameters(config: RunConfig, update: str, selection: str) -> dict[str, Any]:
    """The hyperparameters ``update`` runs with after ``selection``: the option if set, else the tuned value for
    this scenario (per selection rule for first-order and diagonal Newton), else the fallback.

    Returns:
      ``{name: value, ..., "source": "option" | "tuned" | "fallback"}`` (the source of the last value resolved).
    """
    tuned = tuned_values().get("scenarios", {}).get(scenario_name(config), {}).get(update, {})
    values, sources = {}, set()
    for name, fallback in _FALLBACK[update].items():
        option = getattr(config, name)
        entry = tuned.get(name)
        if isinstance(entry, dict):  # per selection rule
            entry = entry.get(selection)
        if option is not None:
            values[name], source = option, "option"
        elif entry is not None:
            values[name], source = entry, "tuned"
        else:
            values[name], source = fallback, "fallback"
        sources.add(source)
    if update == "cg":
        values.update(cg_iterations=config.cg_iterations, hessian_samples=config.hessian_samples)
    values["source"] = "+".join(sorted(sources))
    return values


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=list).encode()).hexdigest()[:16]


def methods(config: RunConfig) -> list[tuple[str, str]]:
    """Every (selection, update) pair the unlearn stage runs, grouped by update."""
    pairs = []
    for update in config.updates:
        names = [s for s in config.selections if update != "cg" or s in config.cg_selections]
        pairs += [(s, update) for s in names]
    return pairs


def curvature_estimators(config: RunConfig) -> list[str]:
    """The estimates the curvature stage computes for ``config``'s selection rules: the Hessian diagonal (diagonal
    Newton and the recall reference need it) and each estimator a rule ranks by."""
    chosen = {ESTIMATOR_OF[s] for s in config.selections if s in ESTIMATOR_OF} - {"hessian"}
    return ["hessian", *sorted(chosen)]


def stage_key(config: RunConfig, stage: str) -> str:
    """A hash of every setting ``stage`` and the stages before it depend on."""
    fields: dict[str, Any] = {}
    for name in STAGES[: STAGES.index(stage) + 1]:
        fields.update({field: getattr(config, field) for field in STAGE_FIELDS[name]})
    if config.scenario != "canary":
        fields = {name: value for name, value in fields.items() if name not in CANARY_FIELDS}
    if config.forgetting == 0:
        fields = {name: value for name, value in fields.items() if name not in FORGETTING_FIELDS}
    defaults = RunConfig()
    fields = {
        name: value for name, value in fields.items() if name not in RECIPE_FIELDS or value != getattr(defaults, name)
    }
    if STAGES.index(stage) >= STAGES.index("curvature"):  # a record must hold every estimate the rules rank by
        fields["estimators"] = curvature_estimators(config)
    if STAGES.index(stage) >= STAGES.index("unlearn"):
        fields["methods"] = {f"{s}/{u}": hyperparameters(config, u, s) for s, u in methods(config)}
    return _hash(fields)


def method_key(config: RunConfig, selection: str, update: str) -> str:
    """A hash of what one unlearned model depends on: the masks' settings, the update and its hyperparameters, so
    that adding an update or a selection keeps the finished methods."""
    return _hash([stage_key(config, "select"), selection, update, hyperparameters(config, update, selection)])
