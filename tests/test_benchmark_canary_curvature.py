"""benchmarks/canary_curvature.py: the noise-corrected error against diag(H) on synthetic data, and a smoke run at a
tiny size whose JSON scores every candidate."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "canary_curvature.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("canary_curvature", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_subtracting_the_reference_noise_recovers_the_error_against_the_true_diagonal(bench):
    """A reference that is the mean of two noisy halves overstates every estimate's error; the halves' difference
    measures that noise, and subtracting it leaves the error against the true diagonal."""
    rng = np.random.default_rng(0)
    truth = rng.gamma(1.0, size=200_000)
    first, second = (truth + rng.normal(0, 1.0, truth.size) for _ in range(2))
    reference = (first + second) / 2
    noise = float(np.sum((first - second) ** 2)) / 4
    estimate = truth + rng.normal(0, 0.3, truth.size)
    scores = bench._scores(estimate, reference, noise)
    expected = np.linalg.norm(estimate - truth) / np.linalg.norm(truth)
    assert scores["relative_error"] > 2 * expected  # against the noisy reference
    assert abs(scores["error_against_diag_h"] - expected) < 0.02 * expected
    assert 0.0 <= scores["recall@1%"] <= 1.0


def test_a_tiny_run_scores_every_candidate(bench, tmp_path):
    out = tmp_path / "canary-curvature.json"
    argv = ["--windows", "16", "--reference-probes", "2", "--samples", "2", "--probes", "1", "--out", str(out)]
    assert bench.main([*argv, "--", "--train-steps", "3", "--context", "16", "--batch-size", "8"]) == 0
    record = json.loads(out.read_text())
    assert set(record["candidates"]) == {"hutchinson-1", "hutchinson-4", "gnb-1", "gnb-2", "residual-1-1", "fisher"}
    assert record["windows"] == 16 and record["best_recall@1%"] in record["candidates"]
    for row in record["candidates"].values():
        assert row["seconds"] > 0 and np.isfinite(row["relative_error"]) and row["error_against_diag_h"] >= 0
        assert all(0.0 <= row[k] <= 1.0 for k in ("recall@0.1%", "recall@1%", "recall@10%"))
