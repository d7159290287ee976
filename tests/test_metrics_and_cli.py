"""Selection-quality metrics and atomic writes."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxforget.atomic import write_json_atomic
from jaxforget.metrics import relative_error, top_k_recall


def test_top_k_recall_counts_shared_top_entries():
    reference = {"a": jnp.array([5.0, 4.0, 3.0]), "b": jnp.array([[2.0, 1.0], [0.0, -1.0]])}
    same_order = {"a": jnp.array([50.0, 40.0, 30.0]), "b": jnp.array([[20.0, 10.0], [0.0, -10.0]])}
    reversed_order = {"a": jnp.array([-5.0, -4.0, -3.0]), "b": jnp.array([[-2.0, -1.0], [0.0, 1.0]])}
    assert float(top_k_recall(same_order, reference, 2 / 7)) == 1.0
    assert float(top_k_recall(reversed_order, reference, 2 / 7)) == 0.0
    half = {"a": jnp.array([5.0, 0.0, 0.0]), "b": jnp.array([[9.0, 0.0], [0.0, 0.0]])}  # top-2: a[0], b[0,0]
    assert float(top_k_recall(half, reference, 2 / 7)) == 0.5
    with pytest.raises(ValueError, match="fraction"):
        top_k_recall(reference, reference, 0.0)
    with pytest.raises(ValueError, match="shaped alike"):
        top_k_recall({"a": jnp.ones(3)}, reference, 0.5)


def test_relative_error():
    assert float(relative_error({"x": jnp.array([3.0, 4.0])}, {"x": jnp.array([0.0, 5.0])})) == pytest.approx(
        np.sqrt(10) / 5
    )


def test_atomic_write_leaves_the_old_file_when_serialization_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
