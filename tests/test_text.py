"""Character-level text data (jaxforget.text) and the canary scenario (jaxforget.scenarios.canary)."""

import hashlib
import math
import platform
import sys

import numpy as np
import pytest

from jaxforget.scenarios import CanaryScenario, canary, canary_batches, canary_windows
from jaxforget.text import (
    TEXT_CORPORA,
    CharVocab,
    bits_per_character,
    build_vocab,
    corpus_record,
    load_corpus,
    split_by_position,
    window_starts,
    windows,
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def scenario(corpus):
    return canary(corpus[:20_000], seed=0)


# --- corpus ---------------------------------------------------------------------------------------------------------


def test_pydoc_topics_loads_offline_long_and_stable(corpus):
    from pydoc_data.topics import topics

    assert len(corpus) > 100_000
    assert corpus == "\n\n".join(topics[key] for key in sorted(topics))
    record = corpus_record(corpus)
    assert record == corpus_record(load_corpus())
    assert record == {
        "characters": len(corpus),
        "sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
        "python": platform.python_version(),
    }
    assert corpus_record(corpus + " ")["sha256"] != record["sha256"]


def test_unknown_corpus_lists_the_choices():
    with pytest.raises(ValueError, match="name='wikitext'.*pydoc-topics.*tiny_shakespeare"):
        load_corpus("wikitext")
    assert TEXT_CORPORA == ("pydoc-topics", "tiny_shakespeare")


def test_tiny_shakespeare_absent_names_data_dir_and_download(tmp_path):
    with pytest.raises(ValueError, match="not prepared.*--data-dir.*--download"):
        load_corpus("tiny_shakespeare", data_dir=tmp_path)


def test_tiny_shakespeare_without_tfds_names_data_dir_and_download(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import tensorflow_datasets` fail
    with pytest.raises(ValueError, match="tensorflow-datasets.*--data-dir.*--download"):
        load_corpus("tiny_shakespeare", data_dir=tmp_path)


# --- vocabulary -----------------------------------------------------------------------------------------------------


def test_vocab_round_trips_and_always_holds_the_digits():
    text = "Héllo, wörld ✓\n\tend"
    vocab = build_vocab(text)
    assert vocab.chars == "".join(sorted(set(text) | set("0123456789")))
    assert vocab.size == len(vocab.chars)
    tokens = vocab.encode(text)
    assert tokens.dtype == np.int32 and tokens.shape == (len(text),)
    assert [vocab.chars[t] for t in tokens] == list(text)
    assert vocab.decode(tokens) == text
    assert vocab.decode(vocab.encode("0123456789")) == "0123456789"


def test_vocab_rejects_unknown_characters_and_bad_ids():
    vocab = build_vocab("abc", extra="")
    with pytest.raises(ValueError, match="'z' at offset 2"):
        vocab.encode("abz")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="sorted"):
        CharVocab("ba")
    with pytest.raises(ValueError, match="empty"):
        build_vocab("", extra="")


# --- splits, windows, units -----------------------------------------------------------------------------------------


def test_split_by_position_is_contiguous_in_order_and_covers():
    tokens = np.arange(1000, dtype=np.int32)
    train, validation, test = split_by_position(tokens)
    assert (train.size, validation.size, test.size) == (900, 50, 50)
    np.testing.assert_array_equal(np.concatenate([train, validation, test]), tokens)
    assert split_by_position("abcdefghij", (0.5, 0.3, 0.2)) == ("abcde", "fgh", "ij")


@pytest.mark.parametrize(
    ("tokens", "fractions", "match"),
    [
        (np.arange(100), (0.9, 0.2), "fractions"),
        (np.arange(100), (1.0, 0.0), "fractions"),
        (np.arange(10), (0.9, 0.05, 0.05), "too few"),
        (np.zeros((4, 4)), (0.5, 0.5), "1-D"),
    ],
)
def test_split_by_position_rejects_bad_input(tokens, fractions, match):
    with pytest.raises(ValueError, match=match):
        split_by_position(tokens, fractions)


def test_windows_shapes_shift_and_starts():
    tokens = np.arange(23)
    np.testing.assert_array_equal(window_starts(23, 5), [0, 5, 10, 15])  # 15 + 6 <= 23 < 20 + 6
    np.testing.assert_array_equal(window_starts(23, 5, 3), [0, 3, 6, 9, 12, 15])
    np.testing.assert_array_equal(window_starts(6, 5), [0])
    for stride in (None, 3, 7):
        starts = window_starts(tokens.size, 5, stride)
        batch = windows(tokens, 5, stride)
        assert batch.inputs.dtype == batch.labels.dtype == np.int32
        assert batch.inputs.shape == batch.labels.shape == (starts.size, 5)
        np.testing.assert_array_equal(batch.inputs, starts[:, None] + np.arange(5))
        np.testing.assert_array_equal(batch.labels, starts[:, None] + np.arange(1, 6))


@pytest.mark.parametrize(
    ("num_tokens", "length", "stride", "match"),
    [(5, 5, None, "length=5"), (10, 0, None, "length"), (10, 3, 0, "stride"), (10, 2.0, None, "length")],
)
def test_window_starts_rejects_bad_input(num_tokens, length, stride, match):
    with pytest.raises(ValueError, match=match):
        window_starts(num_tokens, length, stride)


def test_bits_per_character():
    assert bits_per_character(math.log(2)) == pytest.approx(1.0)
    assert bits_per_character(3 * math.log(2)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="mean_loss_nats"):
        bits_per_character(-0.1)


# --- canary ---------------------------------------------------------------------------------------------------------


def _secret_mask(scenario: CanaryScenario) -> np.ndarray:
    mask = np.zeros(len(scenario.text), bool)
    for start, stop in scenario.secret_spans:
        mask[start:stop] = True
    return mask


def test_canary_is_in_text_repetitions_times_and_not_in_clean_text(scenario, corpus):
    needle = scenario.prefix + scenario.secret
    assert scenario.text.count(needle) == 4
    assert scenario.clean_text == corpus[:20_000]
    assert scenario.prefix not in scenario.clean_text and scenario.secret not in scenario.clean_text
    assert len(scenario.secret) == 8 and set(scenario.secret) <= set("0123456789")
    inserted = "\n" + needle + "\n"
    assert scenario.canary_length == len(inserted)
    assert all(scenario.text[p : p + len(inserted)] == inserted for p in scenario.positions)
    assert all(scenario.text[a:b] == scenario.secret for a, b in scenario.secret_spans)
    # Removing the inserted canaries gives back the clean text; they lie at least one canary length apart in it.
    kept = np.ones(len(scenario.text), bool)
    for p in scenario.positions:
        kept[p : p + len(inserted)] = False
    assert "".join(np.array(list(scenario.text))[kept]) == scenario.clean_text
    assert np.all(np.diff(scenario.positions) >= 2 * len(inserted))


def test_corrected_text_differs_only_inside_secret_spans(scenario):
    assert len(scenario.corrected_text) == len(scenario.text)
    text, corrected = np.array(list(scenario.text)), np.array(list(scenario.corrected_text))
    np.testing.assert_array_equal(text != corrected, _secret_mask(scenario) & (text != corrected))
    assert np.any(text != corrected)
    assert all(scenario.corrected_text[a:b] == scenario.replacement for a, b in scenario.secret_spans)
    assert scenario.replacement != scenario.secret and len(scenario.replacement) == len(scenario.secret)
    assert set(scenario.replacement) <= set(scenario.alphabet)
    assert scenario.corrected_text.count(scenario.prefix + scenario.replacement) == 4


def test_canary_is_deterministic_in_the_seed(scenario, corpus):
    again = canary(corpus[:20_000], seed=0)
    assert (again.text, again.secret, again.replacement) == (scenario.text, scenario.secret, scenario.replacement)
    np.testing.assert_array_equal(again.positions, scenario.positions)
    other = canary(corpus[:20_000], seed=1)
    assert other.secret != scenario.secret
    assert not np.array_equal(other.positions, scenario.positions)


def test_canary_options():
    text = "x" * 200
    scenario = canary(text, 3, repetitions=2, secret_length=5, prefix="pin: ", alphabet="ab", separator="|")
    assert scenario.text.count("|pin: " + scenario.secret + "|") == 2
    assert len(scenario.text) == len(text) + 2 * len("|pin: " + scenario.secret + "|")
    assert set(scenario.secret + scenario.replacement) <= {"a", "b"}
    # The tightest fit: 3 canaries of 35 characters need 70 characters between the first and the last offset.
    tight = canary("y" * 70, 0, repetitions=3)
    np.testing.assert_array_equal(tight.positions, [0, 70, 140])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"repetitions": 0}, ValueError, "repetitions"),
        ({"secret_length": 0}, ValueError, "secret_length"),
        ({"alphabet": ""}, ValueError, "alphabet"),
        ({"alphabet": "7"}, ValueError, "alphabet"),
        ({"alphabet": "0112"}, ValueError, "alphabet"),
        ({"repetitions": 3, "text": "y" * 69}, ValueError, "text has 69 characters"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"prefix": None}, ValueError, "prefix"),
    ],
)
def test_canary_rejects_bad_arguments(kwargs, error, match):
    arguments = {"text": "z" * 1000, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        canary(**arguments)


@pytest.mark.parametrize(("length", "stride"), [(16, None), (16, 5), (64, 64)])
def test_canary_windows_are_exactly_those_with_a_secret_character(scenario, length, stride):
    group = canary_windows(scenario, length, stride)
    starts = window_starts(len(scenario.text), length, stride)
    mask = _secret_mask(scenario)
    touches = np.array([mask[s : s + length + 1].any() for s in starts])
    np.testing.assert_array_equal(group, np.flatnonzero(touches))
    assert group.dtype == np.int64 and 4 <= group.size


def test_canary_batches_align_z_and_z_tilde(scenario):
    length = 16
    vocab = build_vocab(scenario.text)
    data = canary_batches(scenario, vocab, length)
    np.testing.assert_array_equal(data.group, canary_windows(scenario, length))
    for name, batch, text in (("train", data.train, scenario.text), ("clean", data.clean, scenario.clean_text)):
        expected = windows(vocab.encode(text), length)
        np.testing.assert_array_equal(batch.inputs, expected.inputs, err_msg=name)
        np.testing.assert_array_equal(batch.labels, expected.labels, err_msg=name)
    np.testing.assert_array_equal(data.poisoned_group.inputs, data.train.inputs[data.group])
    np.testing.assert_array_equal(data.poisoned_group.labels, data.train.labels[data.group])
    # Z~ differs from Z exactly where the row's character lies in a secret span and the replacement differs there.
    starts = window_starts(len(scenario.text), length)[data.group]
    mask = _secret_mask(scenario) & (np.array(list(scenario.text)) != np.array(list(scenario.corrected_text)))
    for field, shift in (("inputs", 0), ("labels", 1)):
        differs = getattr(data.corrected, field) != getattr(data.poisoned_group, field)
        np.testing.assert_array_equal(differs, mask[starts[:, None] + np.arange(length) + shift], err_msg=field)
    # Replacing Z by Z~ in D gives the windows of the corrected text; the clean windows hold no secret.
    repaired = data.train.inputs.copy()
    repaired[data.group] = data.corrected.inputs
    np.testing.assert_array_equal(repaired, windows(vocab.encode(scenario.corrected_text), length).inputs)
    assert scenario.secret not in vocab.decode(data.clean.labels)


def test_canary_windows_reject_a_secret_no_window_learns():
    scenario = canary("", 0, repetitions=1)  # the text is the canary alone: 35 characters, secret at 26..33
    np.testing.assert_array_equal(canary_windows(scenario, 34), [0])
    with pytest.raises(ValueError, match="no window's label"):
        canary_windows(scenario, 10)  # windows end at offset 30
    with pytest.raises(ValueError, match="length=40"):
        canary_windows(scenario, 40)
