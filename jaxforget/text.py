"""Character-level text data for the "secret in the training text" scenario (after Carlini et al., "The Secret
Sharer"): an offline corpus, a character vocabulary, fixed splits and next-character windows.

Corpora (:func:`load_corpus`):

- ``"pydoc-topics"`` (default, offline): the help texts that ship with CPython in ``pydoc_data.topics.topics`` (the
  pages behind ``help("if")``, ``help("LISTS")``, ...), their values in sorted key order joined with ``"\\n\\n"``:
  about 465,000 characters of English prose and Python code on Python 3.11. The text depends on the Python version,
  so :func:`corpus_record` notes the version next to the length and SHA-256.
- ``"tiny_shakespeare"``: Karpathy's 1 MB of Shakespeare through tensorflow-datasets, only from data already
  prepared in ``data_dir`` unless ``download=True``.

A model sees the text as int32 token ids (:class:`CharVocab`), cut into rows of ``length + 1`` consecutive tokens
(:func:`windows`): ``inputs`` are the first ``length`` tokens and ``labels`` the next character at each position, so a
row is one next-character prediction task of ``length`` steps. Losses in nats per character convert to bits per
character with :func:`bits_per_character`.

Typical use: split the clean corpus by position, insert the canary into the training part only (see
:func:`jaxforget.scenarios.canary`), build the vocabulary from all the text the model will see, and cut windows::

    train_text, validation_text, test_text = split_by_position(load_corpus())
    scenario = canary(train_text, seed=0)
    vocab = build_vocab(scenario.text + validation_text + test_text)
    data = canary_batches(scenario, vocab, length=128)  # D, Z, Z~ and the clean retraining set, as Batches
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import platform
from typing import Any

import numpy as np

from jaxforget.models import Batch

__all__ = [
    "TEXT_CORPORA",
    "load_corpus",
    "corpus_record",
    "CharVocab",
    "build_vocab",
    "split_by_position",
    "window_starts",
    "windows",
    "bits_per_character",
]

TEXT_CORPORA = ("pydoc-topics", "tiny_shakespeare")


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _tiny_shakespeare(data_dir: str | os.PathLike | None, download: bool) -> str:
    where = (
        "Point to a directory holding tfds' prepared tiny_shakespeare with `--data-dir DIR` / `data_dir=`, or let it "
        "be fetched with `--download` / `download=True` (needs the network), or use the offline 'pydoc-topics'."
    )
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ValueError(f"tiny_shakespeare needs tensorflow-datasets, which is not installed. {where}") from error
    root = pathlib.Path(
        data_dir or os.environ.get("TFDS_DATA_DIR") or pathlib.Path.home() / "tensorflow_datasets"
    ).expanduser()
    version = str(tfds.builder_cls("tiny_shakespeare").VERSION)
    prepared = root / "tiny_shakespeare" / version / "dataset_info.json"
    if not download and not prepared.is_file():  # checked here, so that nothing can reach the network
        raise ValueError(f"tiny_shakespeare (version {version}) is not prepared in {root}. {where}")
    try:
        dataset = tfds.load("tiny_shakespeare", split="train", data_dir=os.fspath(root), download=download)
    except ImportError as error:
        raise ValueError(f"Reading tiny_shakespeare through tfds.load needs TensorFlow ({error}). {where}") from error
    return "".join(example["text"].decode("utf-8") for example in tfds.as_numpy(dataset))


def load_corpus(
    name: str = "pydoc-topics", *, data_dir: str | os.PathLike | None = None, download: bool = False
) -> str:
    """Loads a text corpus by name.

    Args:
      name: one of ``TEXT_CORPORA``; ``"pydoc-topics"`` is offline and needs nothing but the standard library.
      data_dir: root of the tfds data for ``"tiny_shakespeare"`` (the ``--data-dir`` of the CLI); defaults to
        ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``. Ignored for ``"pydoc-topics"``.
      download: let tfds fetch ``"tiny_shakespeare"`` when it is not prepared in ``data_dir``. Ignored for
        ``"pydoc-topics"``.

    Returns:
      The whole corpus as one string.

    Raises:
      ValueError: an unknown ``name``; or ``"tiny_shakespeare"`` without tensorflow-datasets, or not prepared in
        ``data_dir`` while ``download`` is off (the message names ``--data-dir`` and ``--download``).
    """
    if name == "pydoc-topics":
        return _pydoc_topics()
    if name == "tiny_shakespeare":
        return _tiny_shakespeare(data_dir, download)
    raise ValueError(f"name={name!r} is not a known text corpus; choose one of {TEXT_CORPORA}.")


def corpus_record(text: str) -> dict[str, Any]:
    """What identifies a corpus in a results record.

    Args:
      text: the corpus.

    Returns:
      ``{"characters": len(text), "sha256": hex digest of its UTF-8 bytes, "python": the running Python's version}``
      (the version matters: ``"pydoc-topics"`` changes with it).
    """
    return {
        "characters": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "python": platform.python_version(),
    }


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: token id i is ``chars[i]``.

    Attributes:
      chars: the characters, sorted by code point, each once.
    """

    chars: str

    def __post_init__(self):
        if not isinstance(self.chars, str) or not self.chars:
            raise ValueError(f"chars={self.chars!r} must be a non-empty string; build one with build_vocab(text).")
        if list(self.chars) != sorted(set(self.chars)):
            raise ValueError("chars must be sorted and hold each character once; use ''.join(sorted(set(chars))).")

    @property
    def size(self) -> int:
        """The number of characters (token ids are 0 .. size - 1)."""
        return len(self.chars)

    @property
    def _codes(self) -> np.ndarray:
        return np.array([ord(c) for c in self.chars], dtype=np.uint32)

    def encode(self, text: str) -> np.ndarray:
        """The token ids of ``text``.

        Args:
          text: a string made of characters of the vocabulary.

        Returns:
          int32 array [len(text)].

        Raises:
          ValueError: ``text`` holds a character outside the vocabulary (named, with its offset).
        """
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        vocab = self._codes
        ids = np.minimum(np.searchsorted(vocab, codes), vocab.size - 1)
        unknown = np.flatnonzero(vocab[ids] != codes)
        if unknown.size:
            at = int(unknown[0])
            raise ValueError(
                f"text holds {text[at]!r} at offset {at} (and {unknown.size - 1} more unknown characters), which is "
                "not in the vocabulary; build it from this text (build_vocab(text)) or pass the character in extra."
            )
        return ids.astype(np.int32)

    def decode(self, tokens: Any) -> str:
        """The text of token ids.

        Args:
          tokens: integer ids in [0, size), any shape (flattened in C order).

        Returns:
          The string of their characters.

        Raises:
          ValueError: an id outside [0, size).
        """
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size and (
            not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= self.size
        ):
            raise ValueError(f"tokens must be integer ids in [0, {self.size}); decode only what this vocab encoded.")
        return self._codes[tokens].astype("<u4").tobytes().decode("utf-32-le")


def build_vocab(text: str, extra: str = "0123456789") -> CharVocab:
    """The vocabulary of the characters of ``text`` and ``extra``.

    Args:
      text: the text to cover.
      extra: characters always included; the digits by default, so that any digit secret (and its replacement) is
        encodable whatever the text holds. Pass the canary's alphabet here if it is not digits.

    Returns:
      A ``CharVocab`` of the sorted distinct characters.

    Raises:
      ValueError: both ``text`` and ``extra`` are empty.
    """
    chars = "".join(sorted(set(text) | set(extra)))
    if not chars:
        raise ValueError("text and extra are both empty; a vocabulary needs at least one character.")
    return CharVocab(chars)


def split_by_position(tokens: Any, fractions: tuple[float, ...] = (0.9, 0.05, 0.05)) -> tuple[Any, ...]:
    """Contiguous pieces of a sequence, in order: no randomness, so the same tokens always split the same way.

    Piece i is ``tokens[cut[i]:cut[i + 1]]`` with ``cut = round(cumsum((0,) + fractions) * len(tokens))``.

    Args:
      tokens: a 1-D sequence of token ids, or a string (split into strings, by characters).
      fractions: positive shares summing to 1, one per piece; by default (train, validation, test).

    Returns:
      One piece per fraction (arrays, or strings for a string); concatenated in order they are ``tokens``.

    Raises:
      ValueError: ``tokens`` is not 1-D, ``fractions`` are not positive or do not sum to 1, or a piece would be empty.
    """
    if not isinstance(tokens, str):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D; got shape {tokens.shape}. Flatten it first.")
    size = len(tokens)
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.ndim != 1 or shares.size == 0 or np.any(shares <= 0) or not math.isclose(shares.sum(), 1.0):
        raise ValueError(f"fractions={fractions!r} must be positive and sum to 1, e.g. (0.9, 0.05, 0.05).")
    cuts = np.round(np.concatenate([[0.0], np.cumsum(shares)]) * size).astype(np.int64)
    cuts[-1] = size
    if np.any(np.diff(cuts) <= 0):
        raise ValueError(f"tokens has {size} elements, too few for fractions={fractions!r}; a piece is empty.")
    return tuple(tokens[int(start) : int(stop)] for start, stop in zip(cuts[:-1], cuts[1:], strict=True))


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")


def window_starts(num_tokens: int, length: int, stride: int | None = None) -> np.ndarray:
    """The offsets of the windows :func:`windows` cuts: 0, stride, 2 * stride, ... while a full row fits.

    Window i covers tokens ``[starts[i], starts[i] + length]`` (``length + 1`` of them): its inputs are
    ``starts[i] .. starts[i] + length - 1`` and its labels ``starts[i] + 1 .. starts[i] + length``.

    Args:
      num_tokens: the length of the token sequence.
      length: tokens per input row (the model's context), >= 1.
      stride: offset between consecutive windows; defaults to ``length`` (each token is a label exactly once, except
        the first and those after the last full window).

    Returns:
      int64 array of the start offsets, increasing.

    Raises:
      ValueError: ``length`` or ``stride`` is not a positive int, or ``num_tokens < length + 1`` (no full window).
    """
    _check_positive("length", length)
    stride = length if stride is None else stride
    _check_positive("stride", stride)
    if num_tokens < length + 1:
        raise ValueError(f"length={length} needs at least {length + 1} tokens but there are {num_tokens}; lower it.")
    return np.arange(0, num_tokens - length, stride, dtype=np.int64)


def windows(tokens: Any, length: int, stride: int | None = None) -> Batch:
    """Next-token rows of a token sequence (see :func:`window_starts` for which).

    Args:
      tokens: 1-D integer token ids.
      length: tokens per input row, >= 1.
      stride: offset between windows; defaults to ``length``.

    Returns:
      ``Batch(inputs [W, length], labels [W, length])``, int32 numpy arrays with ``labels[:, t] == inputs[:, t + 1]``
      for t < length - 1: row i is ``tokens[s : s + length + 1]`` split into ``[:-1]`` and ``[1:]``.

    Raises:
      ValueError: ``tokens`` is not a 1-D integer array, or as :func:`window_starts`.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array; got shape {tokens.shape}, dtype {tokens.dtype}.")
    starts = window_starts(tokens.size, length, stride)
    rows = tokens[starts[:, None] + np.arange(length + 1)].astype(np.int32)
    return Batch(rows[:, :-1], rows[:, 1:])


def bits_per_character(mean_loss_nats: float) -> float:
    """Converts a mean cross-entropy in nats per character into bits per character.

    Args:
      mean_loss_nats: the mean loss, >= 0.

    Returns:
      ``mean_loss_nats / ln 2``.

    Raises:
      ValueError: a negative loss (a cross-entropy cannot be).
    """
    if not mean_loss_nats >= 0:
        raise ValueError(f"mean_loss_nats={mean_loss_nats!r} must be a non-negative cross-entropy in nats.")
    return float(mean_loss_nats) / math.log(2)
