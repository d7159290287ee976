"""Training state, steps and loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxforget as jf


@pytest.fixture(scope="module")
def digits():
    data = jf.embedded_dataset("digits")
    return jf.Batch(data.inputs[:300], data.labels[:300])


def _state(model, tx=None):
    tx = tx or optax.adam(1e-2)
    return jax.jit(lambda k: jf.create_train_state(model, k, (1, 8, 8, 1), tx))(jax.random.key(0))


def test_train_step_learns_and_updates_batch_norm_statistics(digits):
    state = _state(jf.CNN(features=(4, 8), hidden=16, use_batch_norm=True))
    before = jax.tree.map(np.asarray, state.batch_stats)
    state, history = jf.fit(
        state, jf.batches(digits, 32, seed=0, epochs=20), jax.jit(jf.train_step), num_steps=60, progress=False
    )
    assert len(history["loss"]) == 60 and int(state.step) == 60
    assert history["loss"][-10:].mean() < 0.5 * history["loss"][:5].mean()
    moved = [
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.batch_stats), strict=True)
    ]
    assert all(moved)


def test_model_without_batch_norm_has_no_statistics(digits):
    state = _state(jf.MLP(hidden=(8,)))
    assert state.batch_stats is None and set(state.variables()) == {"params"}
    state, _ = jax.jit(jf.train_step)(state, jf.Batch(digits.inputs[:16], digits.labels[:16]))
    assert state.batch_stats is None


def test_evaluate_counts_every_sample_once(digits):
    state = _state(jf.MLP(hidden=(8,)))
    result = jf.evaluate(state, digits, jax.jit(jf.eval_step), batch_size=64)  # 300 = 4 x 64 + 44
    logits = jf.predict_logits(state, jnp.asarray(digits.inputs))
    expected = float(np.mean(np.argmax(logits, -1) == digits.labels))
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, digits.labels).mean())
    assert result["count"] == 300 and result["accuracy"] == pytest.approx(expected)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_fit_stops_when_batches_run_out_and_is_silent_without_progress(digits, capsys):
    state = _state(jf.MLP(hidden=(8,)))
    _, history = jf.fit(state, jf.batches(digits, 100, seed=0), jax.jit(jf.train_step), num_steps=10, progress=False)
    assert len(history["loss"]) == 3  # one epoch of three batches
    assert capsys.readouterr().out == ""


def test_bad_arguments(digits):
    state = _state(jf.MLP(hidden=(8,)))
    with pytest.raises(ValueError, match="num_steps"):
        jf.fit(state, [], jf.train_step, num_steps=-1)
    with pytest.raises(ValueError, match="empty"):
        jf.evaluate(state, jf.Batch(digits.inputs[:0], digits.labels[:0]), jf.eval_step)
    with pytest.raises(ValueError, match="input_shape"):
        jf.create_train_state(jf.MLP(), jax.random.key(0), (8,), optax.sgd(0.1))
