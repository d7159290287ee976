"""compare_estimators, compare_at_budget and `jaxforget bench`: exact against the dense Hessian, Hutchinson's error
falling with probes, the same-budget mode spending its budget, bad inputs refused before compute, the CLI's files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_hessian, to_float64

import jaxforget as jf
from jaxforget import cli, compare

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def problem():
    """A tiny tanh MLP (4 -> 6 -> 3, 51 parameters) in float64, its batch and its dense Hessian's diagonal."""
    model = jf.MLP(num_classes=NUM_CLASSES, hidden=(6,), activation="tanh")
    params = to_float64(jf.init_model(model, jax.random.key(0), (1, 4))["params"])
    inputs = jax.random.normal(jax.random.key(1), (16, 4), jnp.float64)
    batch = jf.Batch(inputs, jax.random.randint(jax.random.key(2), (16,), 0, NUM_CLASSES))
    loss_fn, logits_fn = jf.loss_fn_for(model), jf.logits_fn_for(model)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    reference = unravel(jnp.asarray(np.diag(dense_hessian(loss_fn, params, batch))))
    return loss_fn, logits_fn, params, batch, reference


def test_exact_matches_the_dense_hessian_and_hutchinson_error_falls_with_probes(problem):
    loss_fn, logits_fn, params, batch, reference = problem
    names = ["exact", "hutchinson:2", "hutchinson:32", "hutchinson:512", "saliency", "gradient"]
    rows = compare.compare_estimators(
        loss_fn, params, batch, key=jax.random.key(3), logits_fn=logits_fn, estimators=names, reference=reference,
        budgets=(0.05, 0.2, 1.0), repeats=1,
    )  # fmt: skip
    by = {(r.name, r.settings.get("num_probes")): r for r in rows}
    exact = by["exact", None]
    assert exact.rel_error < 1e-10 and exact.recall == {0.05: 1.0, 0.2: 1.0, 1.0: 1.0}
    assert exact.products == 51 and exact.time_ms > 0 and exact.timed_runs == 1 and exact.grad_equivalents > 0
    errors = [by["hutchinson", k].rel_error for k in (2, 32, 512)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.5 * errors[0]
    # Unbiased and scored against this batch's own Hessian: the standard error predicts the error's size.
    assert 0.5 < by["hutchinson", 512].stderr_rel / errors[2] < 2.0
    assert [by["hutchinson", k].products for k in (2, 32, 512)] == [2, 32, 512]
    assert by["saliency", None].rel_error is None and by["saliency", None].recall is not None
    gradient = by["gradient", None].to_dict()
    assert gradient["rel_error"] is None and "recall@5%" not in gradient and gradient["products"] == 1
    json.dumps([r.to_dict() for r in rows])  # JSON-able
    # The registry's "exact" reference is the same diagonal.
    again = compare.compare_estimators(loss_fn, params, batch, key=jax.random.key(3), estimators=["exact"], repeats=1)
    assert again[0].rel_error < 1e-10 and again[0].to_dict()["recall@1%"] == 1.0


def test_same_budget_mode_spends_the_stated_products(problem):
    loss_fn, logits_fn, params, batch, reference = problem
    key = jax.random.key(4)
    rows = compare.compare_at_budget(
        loss_fn, params, batch, products=NUM_CLASSES, key=key, logits_fn=logits_fn, reference=reference, repeats=1
    )
    assert [r.name for r in rows] == ["hutchinson", "gnb", "ggn"]  # the exact GGN costs C = 3 products
    assert all(r.products == NUM_CLASSES for r in rows) and all(r.error is None for r in rows)
    hutchinson = jax.jit(lambda p, b, k: jf.hutchinson_diagonal(loss_fn, p, b, k, num_probes=NUM_CLASSES))
    gnb = jax.jit(lambda p, x, k: jf.gnb_diagonal(logits_fn, p, x, k, num_samples=NUM_CLASSES))
    hutchinson, gnb = hutchinson(params, batch, key), gnb(params, batch.inputs, key)
    ggn = jax.jit(lambda p, x: jf.ggn_diagonal(logits_fn, p, x))(params, batch.inputs)
    for row, expected in zip(rows, (hutchinson, gnb, ggn), strict=True):
        np.testing.assert_allclose(
            jax.flatten_util.ravel_pytree(row.estimate)[0], jax.flatten_util.ravel_pytree(expected)[0], rtol=1e-9
        )
    assert rows[1].stderr is not None and rows[1].stderr_rel > 0  # three sampled labels: a standard error
    at_one = compare.compare_at_budget(loss_fn, params, batch, products=1, key=key, reference=reference, repeats=1)
    assert [r.name for r in at_one] == ["hutchinson", "fisher", "saliency"]  # no logits_fn: no Gauss-Newton


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"estimators": ["hutchinsn"]}, "unknown estimator 'hutchinsn'"),
        ({"estimators": ["hutchinson:0"]}, "num_probes must be a positive integer; got 0"),
        ({"estimators": ["fisher:3"]}, "takes no count"),
        ({"estimators": ["ggn"]}, "'ggn' needs logits_fn"),
        ({"estimators": []}, "estimators is empty"),
        ({"reference": "ggn"}, "reference='ggn' needs logits_fn"),
        ({"reference": "hessian"}, "reference='hessian'"),
        ({"reference": {"w": jnp.zeros(3)}}, "reference must have the same tree structure as params"),
        ({"budgets": (0.0,)}, "budgets="),
        ({"budgets": (0.01, 1.5)}, "budgets="),
        ({"repeats": 0}, "repeats must be a positive integer; got 0"),
    ],
)
def test_bad_inputs_raise_before_compute(problem, monkeypatch, kwargs, fragment):
    loss_fn, _, params, batch, _ = problem

    def no_compute(*args, **kw):
        raise AssertionError("computed before checking the inputs")

    monkeypatch.setattr(compare, "_measure", no_compute)
    monkeypatch.setattr(compare, "exact_diagonal", no_compute)
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        compare.compare_estimators(loss_fn, params, batch, key=jax.random.key(0), **{"repeats": 1, **kwargs})
    with pytest.raises(ValueError, match="products must be a positive integer; got 0"):
        compare.compare_at_budget(loss_fn, params, batch, products=0, key=jax.random.key(0))


def test_bench_writes_json_and_plot_and_prints_tables(tmp_path, capsys):
    out = tmp_path / "mlp.json"
    args = [
        "bench", "--model", "mlp", "--batch-size", "16", "--repeats", "1", "--train-steps", "2", "--probes", "2",
        "--samples", "2", "--same-budget", "1", "--noise-sources", "--noise-batch-size", "512", "--noise-repeats",
        "1", "--out", str(out),
    ]  # fmt: skip
    status = cli.main(args)
    assert status == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("jaxforget bench --model mlp") and record["reference"] == "exact"
    assert record["model"] == {"name": "mlp", "dataset": "digits", "num_params": 3760, "batch_size": 16,
                               "train_steps": 2}  # fmt: skip
    rows = {(r["estimator"], tuple(sorted(r["settings"].items()))): r for r in record["rows"]}
    assert set(rows) == {("gradient", ()), ("exact", ()), ("hutchinson", (("num_probes", 2),)), ("ggn", ()),
                         ("gnb", (("num_samples", 2),)), ("fisher", ()), ("saliency", ())}  # fmt: skip
    assert rows["exact", ()]["rel_error"] == 0.0 and rows["exact", ()]["recall@1%"] == 1.0
    assert all(r["error"] is None and r["time_ms"] > 0 for r in record["rows"])
    assert [r["products"] for r in record["same_budget"]["1"]] == [1, 1, 1, 1]
    study = record["noise_sources"]
    assert study["examples"] == 1536 and study["batch_size"] == 512 and study["num_classes"] == 10
    exact_all = [p for p in study["points"] if p["strategy"] == "exact" and p["examples"] == 1536]
    assert exact_all[0]["recall@1%"] == 1.0  # the reference itself
    for p in study["points"]:
        per_example = 10 if p["strategy"] == "exact" else p["draws"]
        assert p["cost"] == per_example * p["examples"] and 0.0 <= p["recall@1%_min"] <= p["recall@1%_max"] <= 1.0
    assert {(p["strategy"], p["estimator"]) for p in study["points"]} == {
        ("exact", "ggn"),
        ("examples", "gnb"),
        ("draws", "gnb"),
        ("examples", "hutchinson"),
        ("draws", "hutchinson"),
    }
    plot = out.with_name("mlp-noise-sources.png")
    assert study["plot"] == str(plot) and plot.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "Curvature estimators: mlp" in printed and "hutchinson" in printed and "Top-1% recall" in printed


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--budgets", "0"], "--budgets"),
        (["--probes", "0,4"], "--probes"),
        (["--model", "cnn", "--reference", "exact"], "--reference exact"),
        (["--model", "mlp", "--noise-sources", "--noise-batch-size", "1000"], "--noise-batch-size"),
    ],
)
def test_bench_bad_options_get_one_line_before_compute(options, fragment, monkeypatch, capsys):
    monkeypatch.setattr(compare, "bench_problem", lambda *a, **k: pytest.fail("computed before the checks"))
    assert cli.main(["bench", *options]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and fragment in error
