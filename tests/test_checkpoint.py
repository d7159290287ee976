"""Checkpoints: bitwise round trips, restoring under another optimizer, clear errors, atomic saves, and corrupt
checkpoints detected before their weights are used."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxforget as jf
import jaxforget.checkpoint as checkpoint
from jaxforget.atomic import CorruptFileError, sha256_file
from jaxforget.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint, verify_checkpoint
from jaxforget.train import create_train_state, train_step

INPUT_SHAPE = (2, 8, 8, 1)
MODEL = jf.CNN(features=(3, 4), hidden=8, use_batch_norm=True)


def init_fn(model, tx):
    """``create_train_state`` under jit (eager Flax initialization is slow on CPU)."""
    return jax.jit(lambda key: create_train_state(model, key, INPUT_SHAPE, tx))


# One jitted initializer for the trained state and the fresh targets, compiled once.
init_adam = init_fn(MODEL, optax.adam(1e-2))


def abstract_state(model, tx):
    """A state of shapes and dtypes only (``jax.eval_shape``): nothing is initialized or compiled."""
    return jax.eval_shape(lambda key: create_train_state(model, key, INPUT_SHAPE, tx), jax.random.key(0))


def leaf_bits(tree) -> list[tuple[str, np.dtype, tuple, bytes]]:
    """Path, dtype, shape and raw bytes of every leaf: equal lists mean bitwise-equal trees (-0.0 differs from 0.0)."""
    return [
        (jax.tree_util.keystr(path), np.asarray(leaf).dtype, np.shape(leaf), np.asarray(leaf).tobytes())
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


@pytest.fixture(scope="module")
def trained():
    """A CNN with batch norm after three Adam steps: non-trivial params, batch stats, moments and step count; its
    batch stats are float64 (computed from float64 inputs) while a fresh state's are float32."""
    state = init_adam(jax.random.key(0))
    inputs = jax.random.normal(jax.random.key(1), INPUT_SHAPE)
    batch = jf.Batch(inputs, jnp.array([1, 2]))
    step = jax.jit(train_step)
    for _ in range(3):
        state, _ = step(state, batch)
    params = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(-0.0), state.params)  # a -0.0 must stay -0.0
    return state.replace(params=params), batch


@pytest.fixture(scope="module")
def fresh_target():
    return init_adam(jax.random.key(42))


def extras_for(state):
    return {
        "mask": jax.tree.map(lambda a: a > 0, state.params),
        "curvature": jax.tree.map(lambda a: jnp.square(a.astype(jnp.float64)), state.params),
    }


def test_round_trip_is_bitwise(tmp_path, trained, fresh_target):
    state, _ = trained
    extra = extras_for(state)
    metadata = {"config": {"learning_rate": 0.01, "features": [3, 4]}, "data_seed": 7}
    path = save_checkpoint(tmp_path, state, extra=extra, metadata=metadata)

    restored, restored_extra, restored_metadata = restore_checkpoint(tmp_path, fresh_target)

    assert path == latest_checkpoint(tmp_path) and path.parent == tmp_path
    assert leaf_bits(fresh_target.params) != leaf_bits(state.params)
    for name in ("step", "params", "batch_stats", "opt_state"):
        assert leaf_bits(getattr(restored, name)) == leaf_bits(getattr(state, name)), name
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    assert jax.tree.leaves(restored.batch_stats)[0].dtype == jnp.float64  # the saved dtype, not the target's float32
    assert leaf_bits(restored_extra) == leaf_bits(extra)
    assert {leaf.dtype for leaf in jax.tree.leaves(restored_extra["mask"])} == {np.dtype(bool)}
    assert {name: restored_metadata[name] for name in metadata} == metadata
    assert restored_metadata["opt_state_restored"] is True
    assert restored_metadata["format"] == checkpoint.CHECKPOINT_FORMAT
    versions = restored_metadata["versions"]
    assert {"jaxforget", "jax", "flax", "optax", "orbax-checkpoint", "python"} <= versions.keys()
    assert versions["jax"] == jax.__version__


def test_extra_target_gives_structure_and_array_type(tmp_path, trained, fresh_target):
    state, _ = trained
    extra = extras_for(state)
    save_checkpoint(tmp_path, state, extra=extra)
    extra_target = jax.tree.map(jnp.zeros_like, extra)

    _, restored_extra, _ = restore_checkpoint(tmp_path, fresh_target, extra_target=extra_target)

    assert leaf_bits(restored_extra) == leaf_bits(extra)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored_extra))
    wrong = {"mask": extra["mask"], "curvature": {"Dense_0": extra["curvature"]["Dense_0"]}}
    with pytest.raises(
        ValueError, match=r"^extra_target .*curvature/Conv_0/bias is in the checkpoint but not in extra_target"
    ):
        restore_checkpoint(tmp_path, fresh_target, extra_target=wrong)


def test_restore_into_an_abstract_target(tmp_path, trained):
    state, _ = trained
    save_checkpoint(tmp_path, state, extra={"pair": (np.arange(3), np.array([True]))})

    restored, extra, metadata = restore_checkpoint(tmp_path, abstract_state(MODEL, optax.adam(1e-2)))

    assert metadata["opt_state_restored"] is True
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))
    assert leaf_bits((restored.step, restored.params, restored.batch_stats, restored.opt_state)) == leaf_bits(
        (state.step, state.params, state.batch_stats, state.opt_state)
    )
    assert isinstance(extra["pair"], list)  # orbax stores tuples as lists
    assert leaf_bits(extra) == leaf_bits({"pair": [np.arange(3), np.array([True])]})


def test_model_without_batch_norm_or_optimizer_state(tmp_path):
    init = init_fn(jf.MLP(hidden=(4,)), optax.sgd(0.1))
    state = init(jax.random.key(0))
    save_checkpoint(tmp_path, state)

    restored, _, metadata = restore_checkpoint(tmp_path, init(jax.random.key(1)))

    assert restored.batch_stats is None and metadata["opt_state_restored"] is True
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    assert leaf_bits(restored.params) == leaf_bits(state.params)


def test_saved_dtypes_are_kept_over_the_targets(tmp_path, fresh_target):
    params = jax.tree.map(lambda a: a.astype(jnp.float64) / 3, fresh_target.params)
    state = fresh_target.replace(params=params, opt_state=fresh_target.tx.init(params), step=jnp.asarray(5))
    save_checkpoint(tmp_path, state)

    restored, extra, metadata = restore_checkpoint(tmp_path, fresh_target)

    assert extra is None
    assert leaf_bits(restored.params) == leaf_bits(params)
    assert leaf_bits(restored.opt_state) == leaf_bits(state.opt_state)
    assert metadata["opt_state_restored"] is True


def test_restore_under_another_optimizer_reinitializes_opt_state(tmp_path, trained, fresh_target):
    state, batch = trained
    save_checkpoint(tmp_path, state)
    sgd = optax.sgd(0.1, momentum=0.9)
    target = jf.with_optimizer(fresh_target, sgd)

    restored, _, metadata = restore_checkpoint(tmp_path, target)

    assert metadata["opt_state_restored"] is False
    assert restored.tx is sgd
    assert leaf_bits(restored.params) == leaf_bits(state.params)
    assert leaf_bits(restored.batch_stats) == leaf_bits(state.batch_stats)
    assert leaf_bits(restored.step) == leaf_bits(state.step)
    assert leaf_bits(restored.opt_state) == leaf_bits(sgd.init(state.params))
    stepped, metrics = jax.jit(train_step)(restored, batch)
    assert int(stepped.step) == int(state.step) + 1 and np.isfinite(float(metrics["loss"]))
    assert any(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(stepped.opt_state))


@pytest.mark.parametrize(
    ("model", "path"),
    [
        (
            jf.CNN(features=(3, 5), hidden=8, use_batch_norm=True),
            r"params/Conv_1/bias has shape \(4,\) in the checkpoint but \(5,\)",
        ),
        (jf.CNN(features=(3, 4), hidden=8, use_batch_norm=False), r"batch_stats/BatchNorm_0/mean is in the checkpoint"),
    ],
    ids=["wider", "no-batch-norm"],
)
def test_mismatched_target_is_a_clear_error(tmp_path, trained, model, path):
    state, _ = trained
    save_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match=rf"^target does not match .*{path}.*create_train_state"):
        restore_checkpoint(tmp_path, abstract_state(model, optax.adam(1e-2)))


@pytest.mark.parametrize("crash_at", ["orbax-write", "pointer"])
def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, trained, fresh_target, crash_at):
    state, _ = trained
    good = save_checkpoint(tmp_path, state, extra=extras_for(state), metadata={"run": "A"})

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        if crash_at == "orbax-write":  # the model and optimizer items are being written when the metadata one fails
            patch.setattr(ocp.JsonCheckpointHandler, "async_save", crash)
        else:  # the new checkpoint is complete on disk, but LATEST still names the old one
            patch.setattr(checkpoint, "write_text_atomic", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_checkpoint(tmp_path, state.replace(step=state.step + 100), metadata={"run": "B"})
    leftovers = {p.name for p in tmp_path.iterdir()} - {"LATEST", good.name}
    assert leftovers and all(name.startswith("ckpt_") for name in leftovers)

    restored, extra, metadata = restore_checkpoint(tmp_path, fresh_target)
    assert latest_checkpoint(tmp_path) == good and metadata["run"] == "A"
    assert leaf_bits((restored.step, restored.params, restored.batch_stats, restored.opt_state)) == leaf_bits(
        (state.step, state.params, state.batch_stats, state.opt_state)
    )
    assert leaf_bits(extra) == leaf_bits(extras_for(state))

    newest = save_checkpoint(tmp_path, state.replace(step=state.step + 200), metadata={"run": "C"})
    assert {p.name for p in tmp_path.iterdir()} == {"LATEST", newest.name}
    restored, extra, metadata = restore_checkpoint(tmp_path, fresh_target)
    assert metadata["run"] == "C" and int(restored.step) == int(state.step) + 200 and extra is None


def test_saving_again_keeps_only_the_newest(tmp_path, trained, fresh_target):
    state, _ = trained
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    first = save_checkpoint(tmp_path, state, metadata={"run": 1})
    second = save_checkpoint(tmp_path, state.replace(step=state.step + 1), metadata={"run": 2})

    assert first != second and not first.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["LATEST", second.name, "notes.txt"])
    assert json.loads((tmp_path / "LATEST").read_text())["checkpoint"] == second.name
    restored, _, metadata = restore_checkpoint(tmp_path, fresh_target)
    assert metadata["run"] == 2 and int(restored.step) == int(state.step) + 1


def test_relative_directories_work(tmp_path, monkeypatch, trained, fresh_target):
    state, _ = trained
    monkeypatch.chdir(tmp_path)
    save_checkpoint("runs/model", state)
    restored, _, _ = restore_checkpoint("runs/model", fresh_target)
    assert leaf_bits(restored.params) == leaf_bits(state.params)


def test_missing_checkpoint_names_the_directory(tmp_path, fresh_target):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        restore_checkpoint(missing, fresh_target)
    assert latest_checkpoint(missing) is None
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}: it has no LATEST"):
        restore_checkpoint(tmp_path, fresh_target)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra": [np.zeros(3, bool)]}, "extra must be a dict"),
        ({"extra": {"mask": {"w": "not an array"}}}, r"extra\['mask'\]\['w'\] is a str"),
        ({"metadata": {"seed": np.arange(2)}}, "metadata must be JSON-serializable"),
        ({"metadata": {"versions": "mine"}}, r"metadata keys \['versions'\] are reserved"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, fresh_target, kwargs, message):
    directory = tmp_path / "checkpoints"
    with pytest.raises(ValueError, match=message):
        save_checkpoint(directory, fresh_target, **kwargs)
    assert not directory.exists()


# Corrupt checkpoints: each is detected before orbax reads a byte of it, and named.


def largest_data_file(path):
    """The largest array-data chunk (``.../d/<hash>``) of the checkpoint ``path``."""
    return max((file for file in path.rglob("*") if file.is_file() and file.parent.name == "d"), key=_size)


def _size(file):
    return file.stat().st_size


def flip_one_bit(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0b0001_0000
    file.write_bytes(bytes(data))


def forbid_orbax(monkeypatch):
    """Makes any orbax read of a checkpoint fail the test: verification must come first."""

    def read(*args, **kwargs):
        raise AssertionError("orbax was asked to read a corrupt checkpoint")

    monkeypatch.setattr(checkpoint, "_checkpointer", read)


def assert_corrupt(directory, target, file, reason):
    """restore_checkpoint and verify_checkpoint both raise CorruptFileError for ``file``, giving ``reason``."""
    for call in (lambda: restore_checkpoint(directory, target), lambda: verify_checkpoint(directory)):
        with pytest.raises(CorruptFileError, match=reason) as raised:
            call()
        assert raised.value.path == file
        assert str(file) in str(raised.value)


def test_pointer_lists_every_file_of_the_checkpoint(tmp_path, trained):
    state, _ = trained
    path = save_checkpoint(tmp_path, state, extra=extras_for(state))

    pointer = json.loads((tmp_path / "LATEST").read_text())

    files = sorted(file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file())
    assert pointer["checkpoint"] == path.name
    assert list(pointer["sha256"]) == files and any(name.startswith("extra/") for name in files)
    assert pointer["sha256"] == {name: sha256_file(path / name) for name in files}
    assert pointer["size"] == {name: (path / name).stat().st_size for name in files}


def test_one_flipped_bit_is_detected_before_orbax_reads(tmp_path, monkeypatch, trained, fresh_target):
    state, _ = trained
    path = save_checkpoint(tmp_path, state)
    file = largest_data_file(path)
    assert file.stat().st_size > 1000  # the params' chunk, not a small index

    flip_one_bit(file)
    forbid_orbax(monkeypatch)

    assert_corrupt(tmp_path, fresh_target, file, "its SHA-256 is [0-9a-f]{64}, not the [0-9a-f]{64} recorded in LATEST")


@pytest.mark.parametrize("name", ["largest-data-file", "model/_METADATA", "metadata/metadata", "manifest.ocdbt"])
def test_truncated_file_is_a_corrupt_file_error(tmp_path, monkeypatch, trained, fresh_target, name):
    state, _ = trained
    path = save_checkpoint(tmp_path, state)
    file = largest_data_file(path) if name == "largest-data-file" else next(path.rglob(name))
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 2])
    forbid_orbax(monkeypatch)

    assert_corrupt(tmp_path, fresh_target, file, rf"it has {size // 2} bytes, but save_checkpoint wrote {size}")


@pytest.mark.parametrize("name", ["largest-data-file", "opt_state/_METADATA", "extra"])
def test_deleted_file_is_a_corrupt_file_error(tmp_path, monkeypatch, trained, fresh_target, name):
    state, _ = trained
    path = save_checkpoint(tmp_path, state, extra=extras_for(state))
    if name == "extra":  # a whole item: the first of its files (in sorted order) is named
        checkpoint._remove(path / "extra")
        file = path / "extra/_METADATA"
    else:
        file = largest_data_file(path) if name == "largest-data-file" else path / name
        file.unlink()
    forbid_orbax(monkeypatch)

    assert_corrupt(tmp_path, fresh_target, file, "it is missing")


def test_unlisted_files_are_ignored(tmp_path, trained, fresh_target):
    state, _ = trained
    path = save_checkpoint(tmp_path, state)
    digest = verify_checkpoint(tmp_path)
    (path / "model" / "leftover.orbax-checkpoint-tmp-1").write_text("not orbax's")
    (path / "stray").mkdir()

    restored, _, _ = restore_checkpoint(tmp_path, fresh_target)

    assert verify_checkpoint(tmp_path) == digest
    assert leaf_bits(restored.params) == leaf_bits(state.params)


def _pointer_with(name, files, **changes):
    sha256 = {file: "0" * 64 for file in files}
    return json.dumps({"checkpoint": name, "sha256": sha256, "size": dict.fromkeys(files, 1), **changes})


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\xff\xfe\x00garbage", "it is not UTF-8 text"),
        (b"ckpt_000001 and more", "it is neither a checkpoint name nor JSON"),
        ("half", "it is neither a checkpoint name nor JSON"),  # the first half of the real pointer
        (b"[]", "it is not a JSON object with the keys"),
        (_pointer_with("../elsewhere", ["model/_METADATA"]), "is not a checkpoint name"),
        (_pointer_with("ckpt_000001", ["../../etc/passwd"]), "which is not a relative path inside the checkpoint"),
        (_pointer_with("ckpt_000001", ["model/_METADATA"], sha256={"model/_METADATA": "x"}), "is not 64 lowercase hex"),
        (_pointer_with("ckpt_000001", []), "the same, non-empty set of files"),
    ],
    ids=["binary", "text", "half-json", "list", "name", "path", "hash", "no-files"],
)
def test_garbage_pointer_is_a_corrupt_file_error(tmp_path, monkeypatch, trained, fresh_target, garbage, reason):
    state, _ = trained
    save_checkpoint(tmp_path, state)
    pointer = tmp_path / "LATEST"
    if garbage == "half":
        garbage = pointer.read_bytes()[: len(pointer.read_bytes()) // 2]
    pointer.write_bytes(garbage if isinstance(garbage, bytes) else garbage.encode())
    forbid_orbax(monkeypatch)

    assert_corrupt(tmp_path, fresh_target, pointer, reason)
    with pytest.raises(CorruptFileError, match=reason):
        latest_checkpoint(tmp_path)


def test_pointer_naming_a_missing_checkpoint_is_file_not_found(tmp_path, trained, fresh_target):
    state, _ = trained
    path = save_checkpoint(tmp_path, state)
    checkpoint._remove(path)
    for call in (latest_checkpoint, verify_checkpoint, lambda directory: restore_checkpoint(directory, fresh_target)):
        with pytest.raises(FileNotFoundError, match=f"names checkpoint '{path.name}', which is not in"):
            call(tmp_path)


def test_legacy_plain_name_pointer_restores_bitwise(tmp_path, trained, fresh_target):
    state, _ = trained
    extra = extras_for(state)
    path = save_checkpoint(tmp_path, state, extra=extra, metadata={"run": "old"})
    digest = verify_checkpoint(tmp_path)
    (tmp_path / "LATEST").write_text(path.name + "\n")  # the pointer format before hashes

    restored, restored_extra, metadata = restore_checkpoint(tmp_path, fresh_target)

    assert latest_checkpoint(tmp_path) == path and metadata["run"] == "old"
    assert leaf_bits((restored.step, restored.params, restored.batch_stats, restored.opt_state)) == leaf_bits(
        (state.step, state.params, state.batch_stats, state.opt_state)
    )
    assert leaf_bits(restored_extra) == leaf_bits(extra)
    # Nothing to verify against: the digest is that of the pointer a save would write for the files as they are.
    assert verify_checkpoint(tmp_path) == digest
    flip_one_bit(largest_data_file(path))
    assert verify_checkpoint(tmp_path) != digest
    # The next save publishes a verifiable checkpoint.
    newer = save_checkpoint(tmp_path, state)
    assert json.loads((tmp_path / "LATEST").read_text())["checkpoint"] == newer.name


def test_orbax_errors_on_an_unverified_checkpoint_are_corrupt_file_errors(tmp_path, trained, fresh_target):
    state, _ = trained
    path = save_checkpoint(tmp_path, state)
    (tmp_path / "LATEST").write_text(path.name + "\n")  # legacy: no hashes, so orbax meets the damage
    metadata = path / "model" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:100])

    with pytest.raises(CorruptFileError, match="^[^\n]* is corrupt: orbax could not read it: [^\n]+$") as raised:
        restore_checkpoint(tmp_path, fresh_target)

    assert raised.value.path == path and raised.value.__cause__ is not None


def test_digest_identifies_the_checkpoint(tmp_path, trained):
    state, _ = trained
    save_checkpoint(tmp_path, state)

    digest = verify_checkpoint(tmp_path)

    assert digest == verify_checkpoint(tmp_path) == hashlib.sha256((tmp_path / "LATEST").read_bytes()).hexdigest()
    params = jax.tree.map(lambda a: a + 1, state.params)
    save_checkpoint(tmp_path, state.replace(params=params))
    assert verify_checkpoint(tmp_path) != digest
