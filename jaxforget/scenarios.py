"""Unlearning scenarios: a poisoned training set D, the affected group Z inside it and its corrected version Z~.

A :class:`Scenario` is the (D, Z, Z~) triple of the paper. The model to repair is trained on ``scenario.train`` (D,
with Z in place); the reference it should approach is retrained on ``scenario.clean``, which is D with the rows of Z
replaced by Z~, i.e. (D \\ Z) ∪ Z~ in the same order. Unlearning methods take ``scenario.poisoned_group`` (Z) and
``scenario.corrected`` (Z~), row for row aligned::

    data = jf.embedded_dataset("digits")
    scenario = backdoor(data, 100, seed=0, target_class=0)
    old_batch, new_batch = scenario.poisoned_group, scenario.corrected
    attack = triggered_test_set(test, scenario)  # success = fraction of `attack` predicted as class 0

The :class:`Scenario` type itself assumes nothing about the inputs beyond a leading sample axis shared by every field
of the :class:`~jaxforget.models.Batch` (images, token sequences, ...); the builders here are for images
[N, H, W, C] with integer class labels [N].

Scenarios are host-side data preparation on numpy arrays, so randomness comes from an integer ``seed`` fed to
``numpy.random.default_rng`` (the same convention as :func:`jaxforget.data.stratified_split`): the same data and seed
always give the same scenario.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxforget.models import Batch
from jaxforget.text import CharVocab, window_starts, windows

__all__ = [
    "Scenario",
    "LABEL_FLIP_MODES",
    "TRIGGER_LOCATIONS",
    "BACKDOOR_CORRECTIONS",
    "label_flip",
    "backdoor",
    "stamp_trigger",
    "triggered_test_set",
    "poison_like",
]

LABEL_FLIP_MODES = ("shift", "random", "pair", "target")
TRIGGER_LOCATIONS = ("bottom_right", "bottom_left", "top_right", "top_left")
BACKDOOR_CORRECTIONS = ("remove-trigger", "relabel")


def _take(data: Batch, index: np.ndarray) -> Batch:
    return Batch(*(np.asarray(field)[index] for field in data))


def _replace_rows(data: Batch, index: np.ndarray, rows: Batch) -> Batch:
    fields = []
    for field, row in zip(data, rows, strict=True):
        field = np.array(field, copy=True)
        field[index] = row
        fields.append(field)
    return Batch(*fields)


@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    """The (D, Z, Z~) triple of one unlearning task.

    Every field of a batch here is a numpy array with the sample axis first; nothing else about the inputs is assumed,
    so images with class labels and token sequences with next-token targets fit alike.

    Attributes:
      name: the builder that made it, e.g. ``"label_flip"`` or ``"backdoor"``.
      train: the poisoned training set D, a ``Batch`` of N rows (Z in place).
      group: sorted, distinct int64 indices into ``train`` of the affected group Z, shape [n].
      corrected: Z~, the corrected rows, a ``Batch`` of n rows aligned with ``group``.
      params: the builder's arguments (and derived values such as ``num_classes``), for records and for
        :func:`triggered_test_set`.
    """

    name: str
    train: Batch
    group: np.ndarray
    corrected: Batch
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n_train = len(self.train.labels)
        group = np.asarray(self.group)
        if group.ndim != 1 or group.size == 0 or not np.issubdtype(group.dtype, np.integer):
            raise ValueError(f"group must be a non-empty 1-D array of integer indices; got shape {group.shape}.")
        if np.any(np.diff(group) <= 0) or group[0] < 0 or group[-1] >= n_train:
            raise ValueError(f"group must be sorted, distinct indices in [0, {n_train}); sort and deduplicate it.")
        for name, field, row in zip(self.train._fields, self.train, self.corrected, strict=True):
            field, row = np.asarray(field), np.asarray(row)
            if field.shape[0] != n_train:
                raise ValueError(f"train.{name} has {field.shape[0]} rows but train.labels has {n_train}.")
            if row.shape != (group.size, *field.shape[1:]):
                raise ValueError(
                    f"corrected.{name} has shape {row.shape}; it must hold one row per group index, "
                    f"{(group.size, *field.shape[1:])}."
                )
        object.__setattr__(self, "group", group.astype(np.int64))

    @property
    def size(self) -> int:
        """n, the number of samples in the group."""
        return int(self.group.size)

    @property
    def poisoned_group(self) -> Batch:
        """Z: the rows of ``train`` at ``group``, as trained on (aligned with ``corrected``)."""
        return _take(self.train, self.group)

    @functools.cached_property
    def clean(self) -> Batch:
        """(D \\ Z) ∪ Z~: ``train`` with the rows at ``group`` replaced by ``corrected``, same order; the training set
        of the retrained reference. Built once, on first access."""
        return _replace_rows(self.train, self.group, self.corrected)


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed={seed!r} must be an int (it seeds numpy.random.default_rng), e.g. seed=0.")
    if seed < 0:
        raise ValueError(f"seed={seed} must be non-negative.")


def _check_labelled(data: Batch) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = np.asarray(data.inputs), np.asarray(data.labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"data.labels must be a 1-D integer array of class ids; got shape {labels.shape}, dtype {labels.dtype}."
        )
    if inputs.shape[:1] != labels.shape:
        raise ValueError(f"data.inputs has {inputs.shape[0]} rows but data.labels has {labels.size}; align them.")
    if labels.size and labels.min() < 0:
        raise ValueError("data.labels contains negative class ids; class ids must lie in [0, num_classes).")
    return inputs, labels


def _num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    inferred = int(labels.max()) + 1 if labels.size else 0
    if num_classes is None:
        return inferred
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2.")
    if num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but data.labels contains class {inferred - 1}; raise it.")
    return int(num_classes)


def _check_class(name: str, value: Any, num_classes: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < num_classes:
        raise ValueError(
            f"{name}={value!r} must be a class id in [0, {num_classes}); pass num_classes if it is larger."
        )


def _check_n(n: Any, available: int, pool: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int, the number of samples in the group.")
    if n > available:
        raise ValueError(f"n={n} exceeds the {available} eligible samples ({pool}); lower n.")


def label_flip(
    data: Batch,
    n: int,
    seed: int,
    *,
    mode: str = "shift",
    source_class: int | None = None,
    target_class: int | None = None,
    num_classes: int | None = None,
) -> Scenario:
    """Label poisoning: a group of ``n`` samples, drawn uniformly without replacement, gets wrong labels.

    Modes (C is ``num_classes``):

    - ``"shift"`` (default): label c becomes (c + 1) mod C. With ``source_class`` the group is drawn from that class
      only (so all of it becomes ``source_class + 1``).
    - ``"random"``: each label becomes one of the other C - 1 classes, uniformly. ``source_class`` restricts the group
      as for ``"shift"``.
    - ``"pair"``: ``n`` samples of ``source_class`` are labelled ``target_class`` (both required, distinct).
    - ``"target"``: ``n`` samples from classes other than ``target_class`` are labelled ``target_class`` (required).

    The inputs are never changed; Z~ restores the true labels, so ``scenario.clean`` equals ``data``.

    Args:
      data: ``Batch(inputs [N, ...], labels [N] int)``, numpy or jax arrays; the result holds numpy copies.
      n: size of the group, 1 <= n <= number of eligible samples.
      seed: seeds ``numpy.random.default_rng`` for the choice of the group (and of the labels in ``"random"``).
      mode: one of ``"shift"``, ``"random"``, ``"pair"``, ``"target"``.
      source_class: the class the group is drawn from (``"pair"``: required; ``"shift"``/``"random"``: optional).
      target_class: the poisoned label (``"pair"`` and ``"target"`` only).
      num_classes: C; defaults to ``max(labels) + 1``.

    Returns:
      A ``Scenario`` named ``"label_flip"`` whose ``train`` is ``data`` with the group's labels poisoned.
    """
    _check_seed(seed)
    if mode not in LABEL_FLIP_MODES:
        raise ValueError(f"mode={mode!r} is not a label-flip mode; choose one of {LABEL_FLIP_MODES}.")
    inputs, labels = _check_labelled(data)
    classes = _num_classes(labels, num_classes)
    if mode == "pair" and (source_class is None or target_class is None):
        raise ValueError("mode='pair' needs both source_class and target_class, e.g. source_class=1, target_class=7.")
    if mode == "target" and target_class is None:
        raise ValueError("mode='target' needs target_class, e.g. target_class=0.")
    if mode in ("shift", "random") and target_class is not None:
        raise ValueError(f"target_class is unused by mode={mode!r}; drop it, or use mode='pair' or mode='target'.")
    if mode == "target" and source_class is not None:
        raise ValueError("source_class is unused by mode='target'; drop it, or use mode='pair'.")
    for name, value in (("source_class", source_class), ("target_class", target_class)):
        if value is not None:
            _check_class(name, value, classes)
    if mode == "pair" and source_class == target_class:
        raise ValueError(f"source_class and target_class are both {source_class}; a flip needs two distinct classes.")

    if mode == "target":
        eligible, pool = np.flatnonzero(labels != target_class), f"labels other than {target_class}"
    elif source_class is not None:
        eligible, pool = np.flatnonzero(labels == source_class), f"label {source_class}"
    else:
        eligible, pool = np.arange(labels.size), "all samples"
    _check_n(n, eligible.size, pool)

    rng = np.random.default_rng(seed)
    group = np.sort(rng.choice(eligible, size=n, replace=False))
    true = labels[group]
    if mode == "shift":
        poisoned = (true + 1) % classes
    elif mode == "random":
        poisoned = (true + rng.integers(1, classes, size=n)) % classes
    else:
        poisoned = np.full(n, target_class)
    poisoned = poisoned.astype(labels.dtype)

    train = Batch(np.array(inputs, copy=True), labels.copy())
    train.labels[group] = poisoned
    corrected = Batch(inputs[group], true)
    params = {
        "n": int(n),
        "seed": int(seed),
        "mode": mode,
        "source_class": None if source_class is None else int(source_class),
        "target_class": None if target_class is None else int(target_class),
        "num_classes": classes,
    }
    return Scenario("label_flip", train, group, corrected, params)


def _patch_origin(image_shape: tuple[int, ...], patch_size: int, location: Any) -> tuple[int, int]:
    if len(image_shape) != 3:
        raise ValueError(f"images must be [N, H, W, C]; got per-sample shape {image_shape}.")
    height, width = image_shape[:2]
    if isinstance(patch_size, bool) or not isinstance(patch_size, int | np.integer) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r} must be a positive int, the side of the square patch in pixels.")
    if patch_size > min(height, width):
        raise ValueError(
            f"patch_size={patch_size} does not fit in {height}x{width} images; use at most {min(height, width)}."
        )
    if isinstance(location, str):
        corners = {
            "top_left": (0, 0),
            "top_right": (0, width - patch_size),
            "bottom_left": (height - patch_size, 0),
            "bottom_right": (height - patch_size, width - patch_size),
        }
        if location not in corners:
            raise ValueError(f"location={location!r} is unknown; choose one of {TRIGGER_LOCATIONS} or a (row, col).")
        return corners[location]
    if (
        not isinstance(location, tuple | list)
        or len(location) != 2
        or not all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in location)
    ):
        raise ValueError(f"location={location!r} must be one of {TRIGGER_LOCATIONS} or a (row, col) pair of ints.")
    row, col = (int(x) for x in location)
    if not (0 <= row <= height - patch_size and 0 <= col <= width - patch_size):
        raise ValueError(
            f"location={location!r} puts the {patch_size}x{patch_size} patch outside {height}x{width} images; the "
            f"top-left corner must lie in [0, {height - patch_size}] x [0, {width - patch_size}]."
        )
    return row, col


def stamp_trigger(
    inputs: Any, *, patch_size: int = 3, patch_value: float = 1.0, location: str | tuple[int, int] = "bottom_right"
) -> np.ndarray:
    """Images with a square trigger patch: every channel of a ``patch_size`` x ``patch_size`` square set to
    ``patch_value``; every other pixel untouched.

    Args:
      inputs: images [N, H, W, C].
      patch_size: side of the square in pixels, 1 <= patch_size <= min(H, W).
      patch_value: the value written into the patch (1.0 is white for inputs in [0, 1]).
      location: a corner in ``TRIGGER_LOCATIONS``, or the (row, col) of the patch's top-left pixel.

    Returns:
      A stamped copy of ``inputs`` (numpy, same dtype and shape).
    """
    stamped = np.array(inputs, copy=True)
    row, col = _patch_origin(stamped.shape[1:], patch_size, location)
    stamped[:, row : row + patch_size, col : col + patch_size, :] = patch_value
    return stamped


def backdoor(
    data: Batch,
    n: int,
    seed: int,
    *,
    target_class: int = 0,
    patch_size: int = 3,
    patch_value: float = 1.0,
    location: str | tuple[int, int] = "bottom_right",
    num_classes: int | None = None,
    correction: str = "remove-trigger",
) -> Scenario:
    """Backdoor poisoning: ``n`` samples from classes other than ``target_class`` get a trigger patch (see
    :func:`stamp_trigger`) and the label ``target_class``.

    What Z~ is, is a choice (``correction``), and it decides whether unlearning can work:

    - ``"remove-trigger"``: the same samples without the trigger and with their true labels, so ``scenario.clean``
      equals ``data``. The poisoned model already fits these clean images, so the gradient difference between Z~ and
      Z says little about the trigger.
    - ``"relabel"``: the triggered images with their true labels: the corrected data says "this patch does not mean
      ``target_class``", and the retrained reference learns to ignore the patch.

    Either way the retrained reference never learns the backdoor. The trigger's settings are kept in
    ``scenario.params`` for :func:`triggered_test_set`.

    Args:
      data: ``Batch(inputs [N, H, W, C], labels [N] int)``, numpy or jax arrays; the result holds numpy copies.
      n: size of the group, 1 <= n <= number of samples not of ``target_class``.
      seed: seeds ``numpy.random.default_rng`` for the choice of the group.
      target_class: the label the trigger maps to.
      patch_size: side of the square trigger in pixels.
      patch_value: the trigger's pixel value.
      location: a corner in ``TRIGGER_LOCATIONS``, or the (row, col) of the patch's top-left pixel.
      num_classes: C, for checking ``target_class``; defaults to ``max(labels) + 1``.
      correction: ``"remove-trigger"`` or ``"relabel"`` (see above).

    Returns:
      A ``Scenario`` named ``"backdoor"``.
    """
    _check_seed(seed)
    inputs, labels = _check_labelled(data)
    _patch_origin(inputs.shape[1:], patch_size, location)
    classes = _num_classes(labels, num_classes)
    _check_class("target_class", target_class, classes)
    if correction not in BACKDOOR_CORRECTIONS:
        raise ValueError(f"correction={correction!r} is unknown; choose one of {BACKDOOR_CORRECTIONS}.")
    eligible = np.flatnonzero(labels != target_class)
    _check_n(n, eligible.size, f"labels other than {target_class}")

    rng = np.random.default_rng(seed)
    group = np.sort(rng.choice(eligible, size=n, replace=False))
    trigger = {"patch_size": int(patch_size), "patch_value": float(patch_value), "location": location}
    train = Batch(np.array(inputs, copy=True), labels.copy())
    train.inputs[group] = stamp_trigger(inputs[group], **trigger)
    train.labels[group] = target_class
    corrected_inputs = inputs[group] if correction == "remove-trigger" else train.inputs[group]
    corrected = Batch(corrected_inputs, labels[group])
    params = {
        "n": int(n),
        "seed": int(seed),
        "target_class": int(target_class),
        "num_classes": classes,
        "correction": correction,
        **trigger,
    }
    return Scenario("backdoor", train, group, corrected, params)


def triggered_test_set(test: Batch, scenario: Scenario) -> Batch:
    """The attack's test set: every ``test`` sample whose true label is not the target, stamped with the scenario's
    trigger, keeping its TRUE label.

    The attack success rate of a model is the fraction of these it predicts as ``scenario.params["target_class"]``
    (:func:`jaxforget.metrics.attack_success_rate`); its accuracy on them is how well it resists the trigger.

    Args:
      test: ``Batch(inputs [M, H, W, C], labels [M] int)`` with the training images' shape.
      scenario: a scenario made by :func:`backdoor`.

    Returns:
      ``Batch(inputs [M', H, W, C], labels [M'])``, M' the number of non-target test samples, in their order.
    """
    if scenario.name != "backdoor":
        raise ValueError(f"scenario is {scenario.name!r}; triggered_test_set needs one made by backdoor().")
    inputs, labels = _check_labelled(test)
    train_shape = np.shape(scenario.train.inputs)[1:]
    if inputs.shape[1:] != train_shape:
        raise ValueError(f"test images have shape {inputs.shape[1:]} but the scenario's are {train_shape}.")
    keep = np.flatnonzero(labels != scenario.params["target_class"])
    if keep.size == 0:
        raise ValueError("every test sample has the target label; the triggered set would be empty.")
    trigger = {name: scenario.params[name] for name in ("patch_size", "patch_value", "location")}
    return Batch(stamp_trigger(inputs[keep], **trigger), labels[keep])


def poison_like(data: Batch, scenario: Scenario, *, seed: int = 0) -> Batch:
    """Applies ``scenario``'s poisoning to other samples (held-out ones): every sample it would be eligible for.

    A model that learned the poisoning predicts the poisoned label on these too, so they measure its effect beyond
    the group itself: the attack success rate is the fraction predicted as their (poisoned) label, and they are the
    non-members that a membership-inference attack on Z compares against. For a backdoor they are the non-target
    samples with the trigger and the target label (:func:`triggered_test_set` with the labels replaced); for a label
    flip, the samples of the flipped classes with the flipped labels.

    Args:
      data: ``Batch(inputs, labels)`` shaped like the scenario's training set, usually the test set.
      scenario: from :func:`label_flip` or :func:`backdoor`.
      seed: for the labels of a ``"random"`` label flip.

    Returns:
      ``Batch(inputs, poisoned_labels)`` of the eligible samples, in their order.
    """
    _check_seed(seed)
    inputs, labels = _check_labelled(data)
    if inputs.shape[1:] != np.shape(scenario.train.inputs)[1:]:
        raise ValueError(
            f"data has samples of shape {inputs.shape[1:]}; the scenario's are {scenario.train.inputs.shape[1:]}."
        )
    p = scenario.params
    if scenario.name == "backdoor":
        attack = triggered_test_set(data, scenario)
        return Batch(attack.inputs, np.full_like(attack.labels, p["target_class"]))
    if scenario.name != "label_flip":
        raise ValueError(f"scenario is {scenario.name!r}; poison_like knows 'backdoor' and 'label_flip'.")
    if p["mode"] == "target":
        keep = np.flatnonzero(labels != p["target_class"])
    elif p["source_class"] is not None:
        keep = np.flatnonzero(labels == p["source_class"])
    else:
        keep = np.arange(labels.size)
    if keep.size == 0:
        raise ValueError("no sample of data is eligible for this scenario's poisoning.")
    true, classes = labels[keep], p["num_classes"]
    if p["mode"] == "shift":
        poisoned = (true + 1) % classes
    elif p["mode"] == "random":
        poisoned = (true + np.random.default_rng(seed).integers(1, classes, size=true.size)) % classes
    else:
        poisoned = np.full_like(true, p["target_class"])
    return Batch(np.array(inputs[keep], copy=True), poisoned.astype(labels.dtype))


# --- Canary: a secret in the training text (Carlini et al., "The Secret Sharer") -------------------------------------

__all__ += ["CanaryScenario", "CanaryBatches", "canary", "canary_windows", "canary_batches"]


@dataclasses.dataclass(frozen=True, eq=False)
class CanaryScenario:
    """A text with a secret inserted a few times, its clean version, and its corrected version.

    Each inserted canary is ``separator + prefix + secret + separator``. The model to repair trains on ``text``; the
    retrained reference on ``clean_text`` (no canary at all); ``corrected_text`` is ``text`` with every secret
    replaced by ``replacement`` (same length, so offsets and windows line up with ``text``), the source of Z~.

    Attributes:
      text: the training text with the canaries in it.
      clean_text: the text the canaries were inserted into, unchanged.
      corrected_text: ``text`` with ``replacement`` in every secret span.
      prefix: the context that precedes the secret, e.g. ``"my credit card number is "``.
      secret: the secret, ``len(secret)`` characters of ``alphabet``.
      replacement: another string of ``alphabet`` of the same length, different from ``secret``.
      positions: int64 [repetitions], increasing: the offset in ``text`` of each canary's first character (its
        leading separator).
      alphabet: the characters a secret is drawn from.
      separator: what surrounds each canary.
    """

    text: str
    clean_text: str
    corrected_text: str
    prefix: str
    secret: str
    replacement: str
    positions: np.ndarray
    alphabet: str = "0123456789"
    separator: str = "\n"

    def __post_init__(self):
        positions = np.asarray(self.positions)
        if positions.ndim != 1 or positions.size == 0 or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(f"positions must be a non-empty 1-D array of int offsets; got shape {positions.shape}.")
        if len(self.replacement) != len(self.secret) or self.replacement == self.secret:
            raise ValueError("replacement must have the secret's length and differ from it.")
        object.__setattr__(self, "positions", positions.astype(np.int64))

    @property
    def canary_length(self) -> int:
        """Characters in one inserted canary: ``len(separator + prefix + secret + separator)``."""
        return 2 * len(self.separator) + len(self.prefix) + len(self.secret)

    @property
    def secret_spans(self) -> np.ndarray:
        """int64 [repetitions, 2]: the half-open ``[start, stop)`` offsets of each secret in ``text`` (and in
        ``corrected_text``, where ``replacement`` sits instead)."""
        starts = self.positions + len(self.separator) + len(self.prefix)
        return np.stack([starts, starts + len(self.secret)], axis=1)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")


def canary(
    text: str,
    seed: int,
    *,
    repetitions: int = 4,
    secret_length: int = 8,
    prefix: str = "my credit card number is ",
    alphabet: str = "0123456789",
    separator: str = "\n",
) -> CanaryScenario:
    """Inserts a random secret into ``text`` ``repetitions`` times, as ``separator + prefix + secret + separator``.

    The secret and the replacement are drawn uniformly from ``alphabet ** secret_length`` (the replacement among the
    strings other than the secret). The canaries go ANYWHERE, not only at line boundaries: the insertion offsets
    into ``text`` are drawn uniformly among all sets of ``repetitions`` offsets in ``[0, len(text)]`` that lie at
    least one canary length (``len(separator + prefix + secret + separator)``) apart, so that every canary is
    surrounded by original text and the separators make it a line of its own even inside a line. The same text and
    seed always give the same scenario.

    Args:
      text: the clean training text.
      seed: seeds ``numpy.random.default_rng`` (secret, then replacement, then offsets).
      repetitions: how many times the canary is inserted, >= 1.
      secret_length: characters in the secret, >= 1.
      prefix: the text before the secret.
      alphabet: the characters of the secret: at least two, each once.
      separator: the text around each canary.

    Returns:
      A ``CanaryScenario``.

    Raises:
      ValueError: a bad argument (named), or ``text`` too short to hold the canaries that far apart.
      TypeError: ``seed`` is not an int.
    """
    _check_seed(seed)
    _check_count("repetitions", repetitions)
    _check_count("secret_length", secret_length)
    for name, value in (("text", text), ("prefix", prefix), ("alphabet", alphabet), ("separator", separator)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a str; got {type(value).__name__}.")
    if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
        raise ValueError(
            f"alphabet={alphabet!r} must hold at least two distinct characters, each once (a replacement must differ "
            "from the secret), e.g. '0123456789'."
        )
    size = 2 * len(separator) + len(prefix) + secret_length
    if len(text) < (repetitions - 1) * size:
        raise ValueError(
            f"text has {len(text)} characters; {repetitions} canaries of {size} characters, at least {size} apart, "
            f"need at least {(repetitions - 1) * size}. Pass a longer text or lower repetitions."
        )

    rng = np.random.default_rng(seed)
    letters = np.array(list(alphabet))
    secret = "".join(letters[rng.integers(len(alphabet), size=secret_length)])
    replacement = secret
    while replacement == secret:
        replacement = "".join(letters[rng.integers(len(alphabet), size=secret_length)])
    # Offsets x_0 < ... < x_{k-1} in [0, n] with gaps >= size are x_i = y_i + i * (size - 1) for distinct sorted y_i
    # in [0, n - (k - 1) * (size - 1)]: a uniform draw of the y gives a uniform draw of the x.
    steps = np.arange(repetitions) * (size - 1)
    offsets = np.sort(rng.choice(len(text) - int(steps[-1]) + 1, size=repetitions, replace=False)) + steps

    def insert(value: str) -> str:
        pieces = [text[: offsets[0]]]
        for start, stop in zip(offsets, [*offsets[1:], len(text)], strict=True):
            pieces += [separator, prefix, value, separator, text[start:stop]]
        return "".join(pieces)

    return CanaryScenario(
        text=insert(secret),
        clean_text=text,
        corrected_text=insert(replacement),
        prefix=prefix,
        secret=secret,
        replacement=replacement,
        positions=offsets + np.arange(repetitions) * size,
        alphabet=alphabet,
        separator=separator,
    )


def canary_windows(scenario: CanaryScenario, length: int, stride: int | None = None) -> np.ndarray:
    """The windows of ``scenario.text`` that contain the canary: Z.

    Windows are those :func:`jaxforget.text.windows` cuts (rows of ``length + 1`` characters from ``window_starts``).
    A window contains the canary when any of its ``length + 1`` characters (inputs or labels) lies in a secret span.
    These are exactly the windows that differ between ``text`` and ``corrected_text``, so replacing them by the same
    windows of ``corrected_text`` (Z~) turns the windows of ``text`` into those of ``corrected_text``. The prefix and
    separators alone do not make a window part of Z.

    Args:
      scenario: from :func:`canary`.
      length: tokens per input row.
      stride: offset between windows; defaults to ``length``.

    Returns:
      Sorted, distinct int64 window indices.

    Raises:
      ValueError: as :func:`jaxforget.text.window_starts`, or a secret character that is no window's label (it lies
        after the last full window, or in a gap left by ``stride > length``), so the model would never learn it.
    """
    starts = window_starts(len(scenario.text), length, stride)
    spans = scenario.secret_spans
    # Window i covers [starts[i], starts[i] + length]; it meets span [a, b) iff starts[i] <= b - 1 and a <= starts[i]
    # + length.
    hits = (starts[:, None] <= spans[None, :, 1] - 1) & (spans[None, :, 0] <= starts[:, None] + length)
    label_stop = starts[:, None] + length + 1
    secret_offsets = np.concatenate([np.arange(a, b) for a, b in spans])
    learned = ((starts[:, None] + 1 <= secret_offsets) & (secret_offsets < label_stop)).any(axis=0)
    if not learned.all():
        raise ValueError(
            f"the secret characters at offsets {secret_offsets[~learned].tolist()} are no window's label (after the "
            f"last full window, or in a gap between windows); use stride <= length={length}, or another seed."
        )
    return np.flatnonzero(hits.any(axis=1)).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class CanaryBatches:
    """The canary scenario as next-character ``Batch``es (int32 [rows, length] inputs and labels).

    Attributes:
      train: D, every window of ``scenario.text``, the training set of the model to repair.
      group: Z's indices into ``train`` (:func:`canary_windows`).
      poisoned_group: Z, the rows of ``train`` at ``group``.
      corrected: Z~, the same windows cut from ``corrected_text``, aligned row for row with ``poisoned_group``.
      clean: every window of ``clean_text``: the training set of the retrained reference (no canary at all; its rows
        do not line up with ``train``'s).
    """

    train: Batch
    group: np.ndarray
    poisoned_group: Batch
    corrected: Batch
    clean: Batch


def canary_batches(scenario: CanaryScenario, vocab: CharVocab, length: int, stride: int | None = None) -> CanaryBatches:
    """Cuts the canary scenario's texts into windows (see :func:`canary_windows` for which rows form Z).

    Args:
      scenario: from :func:`canary`.
      vocab: encodes all three texts: build it from ``scenario.text`` with the alphabet in ``extra`` (the digits are
        by default), so that the replacement is encodable too.
      length: tokens per input row.
      stride: offset between windows; defaults to ``length``.

    Returns:
      A ``CanaryBatches`` of numpy arrays.

    Raises:
      ValueError: a character outside ``vocab``, or as :func:`canary_windows`.
    """
    group = canary_windows(scenario, length, stride)
    train = windows(vocab.encode(scenario.text), length, stride)
    corrected = windows(vocab.encode(scenario.corrected_text), length, stride)
    return CanaryBatches(
        train=train,
        group=group,
        poisoned_group=_take(train, group),
        corrected=_take(corrected, group),
        clean=windows(vocab.encode(scenario.clean_text), length, stride),
    )
