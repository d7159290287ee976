"""Benchmark of the diagonal curvature estimators: cost, memory and how well each one selects parameters.

A thin caller of :func:`jaxforget.compare.compare_estimators` (which ``jaxforget bench`` also runs). For each model
and estimator it records the median (and the fastest) of ``--repeats`` timed jitted runs after a warm-up, the median
in gradient-equivalents (divided by the median time of a jitted ``jax.grad`` of the same loss), the matrix-vector
products per example it spends, the compiled temporary memory (``memory_analysis().temp_size_in_bytes``), the
relative error against an exact float64 diagonal, the relative size of its per-entry standard error where it has
one, and the top-k recall of that diagonal's largest (signed) entries at k = 0.1%, 1% and 10% of the parameters.
The same-budget section runs every estimator at the same number of products per example (``--same-budget``).

Models:

- ``mlp``: the tanh MLP (hidden 50, 3,760 parameters) on scikit-learn's 8x8 digits; reference: the exact
  Hessian diagonal (``exact_diagonal``, one Hessian-vector product per parameter).
- ``cnn``: the paper's ReLU CNN (421,642 parameters) on real MNIST digits (``mnist5k``); reference: the exact
  GGN diagonal (``ggn_diagonal(method="naive")``), which equals the Hessian diagonal for a network that is
  piecewise linear in its parameters. BackPACK's ``DiagGGNExact`` runs beside it on the same weights and
  batch when ``torch`` and ``backpack-for-pytorch`` (the ``peers`` extra) are installed.
- ``resnet18`` (``--resnet``, meant for a GPU): random images, at initialization, no reference; costs only.

The MLP and the CNN are first trained for ``--train-steps`` Adam steps, since the paper takes the Hessian at
the learned parameters (``--synthetic``: on random inputs and labels instead of the embedded data). Estimators run
in float32; the references in float64. Runs whose compiled temporary memory exceeds ``--memory-limit-gb`` are
compiled (their memory is reported) but not run; runs slower than ``--time-budget-s`` are timed fewer than
``--repeats`` times (each row records ``timed_runs``).

With jaxforget installed (``pip install -e .``), from the repository root::

    python benchmarks/curvature.py            # writes benchmarks/results/curvature-<device>.json
    python benchmarks/curvature.py --quick    # smoke check, writes curvature-<device>-quick.json
    python benchmarks/curvature.py --resnet --memory-limit-gb 100   # on a GPU

``benchmarks/device_check.py`` builds its own problems from :class:`Problem`, :class:`Estimator`, ``_hutchinson``,
``_ggn``, ``_gradient``, :func:`measure` and :func:`scored_row` (the section "For device_check.py" below).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import pathlib
import shlex
import statistics
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

import jaxforget as jf
from jaxforget import compare
from jaxforget.atomic import write_json_atomic
from jaxforget.timing import time_runs

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
RECALL_FRACTIONS = {"recall@0.1%": 0.001, "recall@1%": 0.01, "recall@10%": 0.1}
PROBE_COUNTS = (1, 4, 16, 64, 256)
PROBE_BATCH_SIZE = 8
EXACT_BASIS_BATCH_SIZE = 256
REFERENCE_EXAMPLE_BATCH_SIZE = 8  # bounds the float64 per-example gradients of the naive GGN reference
# The row names this benchmark has always written, for the registry's shorter ones.
ROW_NAMES = {"exact": "exact_diagonal", "saliency": "gradient_saliency"}


class Problem(NamedTuple):
    """A model at fixed parameters with its curvature batch and (optionally) the exact float64 diagonal."""

    name: str
    model: nn.Module
    params: Any
    batch_stats: Any
    batch: jf.Batch
    reference: Any


# ----------------------------------------------------------------------------------------------------------
# The estimators, from the library's registry.


def estimators_for(problem: Problem, probe_counts: list[int], *, exact: bool) -> list[compare.Estimator]:
    """The gradient (the cost unit), Hutchinson with all probes vmapped and ``PROBE_BATCH_SIZE`` at a time, the
    Monte Carlo and exact (layerwise and naive) GGN, the empirical Fisher and |gradient|; ``exact``: also the
    exact Hessian diagonal."""
    loss_fn = jf.loss_fn_for(problem.model, problem.batch_stats)
    logits_fn = jf.logits_fn_for(problem.model, problem.batch_stats)
    named = lambda name, **settings: compare.named_estimator(  # noqa: E731
        name, loss_fn, logits_fn=logits_fn, params=problem.params, batch=problem.batch, **settings
    )
    chosen = [named("gradient")]
    if exact:
        chosen.append(named("exact", basis_batch_size=EXACT_BASIS_BATCH_SIZE))
    for k in probe_counts:
        chosen += [named("hutchinson", num_probes=k, probe_batch_size=b) for b in (None, PROBE_BATCH_SIZE)]
    chosen += [named("gnb", num_samples=1), named("gnb", num_samples=8)]
    chosen += [named("ggn", method="layerwise"), named("ggn", method="naive"), named("fisher"), named("saliency")]
    return [dataclasses.replace(e, name=ROW_NAMES.get(e.name, e.name)) for e in chosen]


def comparison_row(problem: Problem, record: compare.EstimatorComparison) -> dict:
    """A JSON row: the model, then the library's record (every recall key present, ``None`` when unscored)."""
    fields = record.to_dict()
    row = {
        "model": problem.name,
        "estimator": fields.pop("estimator"),
        "settings": fields.pop("settings"),
        "batch_size": int(problem.batch.inputs.shape[0]),
        "num_params": num_params(problem.params),
        **dict.fromkeys(RECALL_FRACTIONS),
        **fields,
    }
    if row["estimator"] == "hutchinson" and row["grad_equivalents"] is not None:
        row["settings"]["grad_equivalents_per_probe"] = row["grad_equivalents"] / row["settings"]["num_probes"]
    return row


def compare_problem(problem: Problem, estimators: list[compare.Estimator], args, console: Console) -> list[dict]:
    """One row per estimator: timed in float32, scored against the problem's float64 reference."""
    console.log(f"{problem.name}: {', '.join(e.name for e in estimators)}")
    records = compare.compare_estimators(
        jf.loss_fn_for(problem.model, problem.batch_stats),
        problem.params,
        problem.batch,
        key=jax.random.key(args.seed),
        logits_fn=jf.logits_fn_for(problem.model, problem.batch_stats),
        estimators=estimators,
        reference=problem.reference,
        budgets=tuple(RECALL_FRACTIONS.values()),
        repeats=args.repeats,
        time_budget_s=args.time_budget_s,
        memory_limit_bytes=args.memory_limit_gb * 2**30,
    )
    return [comparison_row(problem, r) for r in records]


def same_budget_rows(problem: Problem, products: int, args) -> list[dict]:
    """Every estimator at ``products`` matrix-vector products per example (:func:`compare.compare_at_budget`)."""
    records = compare.compare_at_budget(
        jf.loss_fn_for(problem.model, problem.batch_stats),
        problem.params,
        problem.batch,
        products=products,
        key=jax.random.key(args.seed),
        logits_fn=jf.logits_fn_for(problem.model, problem.batch_stats),
        reference=problem.reference,
        budgets=tuple(RECALL_FRACTIONS.values()),
        repeats=args.repeats,
        time_budget_s=args.time_budget_s,
        memory_limit_bytes=args.memory_limit_gb * 2**30,
    )
    return [{"budget_products": products, **comparison_row(problem, r)} for r in records]


# ----------------------------------------------------------------------------------------------------------
# Problems.


def to_float64(tree):
    """Floating-point leaves cast to float64; integer leaves (labels) kept."""
    cast = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree)


def trained_problem(name: str, args, reference: str | None) -> Problem:
    """``jaxforget bench``'s ``name`` problem (trained for ``--train-steps``, a batch of ``--batch-size``), with
    the float64 ``reference`` diagonal: ``"exact"`` (the Hessian's) or ``"ggn"`` (naive, exact GGN)."""
    bench = compare.bench_problem(
        name, batch_size=args.batch_size, train_steps=args.train_steps, synthetic=args.synthetic, seed=args.seed
    )
    loss_fn = jf.loss_fn_for(bench.model, bench.batch_stats)
    logits_fn = jf.logits_fn_for(bench.model, bench.batch_stats)
    if reference == "exact":
        run = lambda p, b: jf.exact_diagonal(loss_fn, p, b, basis_batch_size=EXACT_BASIS_BATCH_SIZE)  # noqa: E731
    else:
        run = lambda p, b: jf.ggn_diagonal(  # noqa: E731
            logits_fn, p, b.inputs, method="naive", example_batch_size=REFERENCE_EXAMPLE_BATCH_SIZE
        )
    exact = jax.block_until_ready(jax.jit(run)(to_float64(bench.params), to_float64(bench.batch)))
    return Problem(name, bench.model, bench.params, bench.batch_stats, bench.batch, exact)


def resnet_problem(args) -> Problem:
    """ResNet-18 at initialization on random 32x32x3 images and random labels: costs only."""
    bench = compare.bench_problem("resnet18", batch_size=args.resnet_batch_size, train_steps=0, seed=args.seed)
    return Problem("resnet18", bench.model, bench.params, bench.batch_stats, bench.batch, None)


# ----------------------------------------------------------------------------------------------------------
# For device_check.py: estimators as functions of (model, params, batch_stats, batch, key), and their rows.

# fn(model, params, batch_stats, batch, key) -> a diagonal (or saliency) shaped like params.
EstimatorFn = Callable[[nn.Module, Any, Any, jf.Batch, jax.Array], Any]


class Estimator(NamedTuple):
    name: str
    settings: dict[str, Any]
    fn: EstimatorFn
    is_diagonal_estimate: bool = True  # False for saliencies whose scale is not that of diag(H)


def _gradient(model, params, batch_stats, batch, key):
    del key
    return jax.grad(jf.loss_fn_for(model, batch_stats))(params, batch)


def _hutchinson(num_probes: int, probe_batch_size: int | None) -> EstimatorFn:
    def run(model, params, batch_stats, batch, key):
        loss_fn = jf.loss_fn_for(model, batch_stats)
        return jf.hutchinson_diagonal(
            loss_fn, params, batch, key, num_probes=num_probes, probe_batch_size=probe_batch_size
        )

    return run


def _ggn(method: str, example_batch_size: int | None = None) -> EstimatorFn:
    def run(model, params, batch_stats, batch, key):
        del key
        logits_fn = jf.logits_fn_for(model, batch_stats)
        return jf.ggn_diagonal(logits_fn, params, batch.inputs, method=method, example_batch_size=example_batch_size)

    return run


class Measurement(NamedTuple):
    seconds: list[float]  # the timed runs, or the warm-up alone when it took the budget; empty when skipped
    timed_runs: int
    temp_bytes: int | None
    output: Any


def measure(fn: Callable, args: tuple, repeats: int, memory_limit_bytes: float, budget_s: float) -> Measurement:
    """Compiles ``fn`` for ``args``, runs it once to warm up, then times up to ``repeats`` runs.

    Timed runs stop once warm-up and timed runs together have taken ``budget_s``; a run whose warm-up alone takes
    that long is reported from the warm-up (``timed_runs=0``). Runs are skipped (no ``seconds``) when the
    compiled temporary memory exceeds ``memory_limit_bytes``.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp_bytes = getattr(analysis, "temp_size_in_bytes", None)
    if temp_bytes is not None and temp_bytes > memory_limit_bytes:
        return Measurement([], 0, temp_bytes, None)
    times, warm_up, output = time_runs(compiled, args, repeats=repeats, budget_s=budget_s)
    return Measurement(times or [warm_up], len(times), temp_bytes, output)


def flat(tree) -> np.ndarray:
    """All leaves raveled into one float64 vector, in ``jax.tree.leaves`` order."""
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def quality(estimate, reference, is_diagonal_estimate: bool) -> dict[str, float | None]:
    """Relative error (for estimates of diag(H) only) and top-k recalls against ``reference``."""
    if reference is None or estimate is None:
        return {"rel_error": None, **dict.fromkeys(RECALL_FRACTIONS)}
    est, ref = to_float64(estimate), to_float64(reference)
    error = float(jf.relative_error(est, ref)) if is_diagonal_estimate else None
    recalls = {name: float(jf.top_k_recall(est, ref, f)) for name, f in RECALL_FRACTIONS.items()}
    return {"rel_error": error, **recalls}


def num_params(params) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def make_row(problem: Problem, estimator: str, settings: dict, seconds: list[float], grad_seconds: float) -> dict:
    """A row's identity and timings: the median and the fastest of ``seconds`` (the fastest is the least
    disturbed by other work on the machine), and the median in units of ``grad_seconds``."""
    median = statistics.median(seconds) if seconds else None
    return {
        "model": problem.name,
        "estimator": estimator,
        "settings": settings,
        "batch_size": int(problem.batch.inputs.shape[0]),
        "num_params": num_params(problem.params),
        "time_ms": None if median is None else 1e3 * median,
        "min_time_ms": 1e3 * min(seconds) if seconds else None,
        "grad_equivalents": None if median is None else median / grad_seconds,
    }


def scored_row(problem: Problem, estimator: Estimator, result: Measurement, grad_seconds: float, reference) -> dict:
    """The full row for one measured estimator, scored against ``reference`` (``None``: no scores)."""
    row = make_row(problem, estimator.name, dict(estimator.settings), result.seconds, grad_seconds)
    if estimator.name == "hutchinson" and row["grad_equivalents"] is not None:
        row["settings"]["grad_equivalents_per_probe"] = row["grad_equivalents"] / estimator.settings["num_probes"]
    row["timed_runs"], row["temp_bytes"] = result.timed_runs, result.temp_bytes
    row.update(quality(result.output, reference, estimator.is_diagonal_estimate))
    return row


# ----------------------------------------------------------------------------------------------------------
# The BackPACK peer and the agreement checks.


def backpack_rows(problem: Problem, jax_grad_seconds: float, args) -> tuple[list[dict], dict]:
    """BackPACK's DiagGGNExact on the CNN (float32 timing, float64 agreement with ``problem.reference``).

    ``grad_equivalents`` counts torch gradients; ``settings["jax_grad_equivalents"]`` counts JAX ones.
    """
    import torch_peer  # needs torch and backpack-for-pytorch, the ``peers`` extra

    images, labels = np.asarray(problem.batch.inputs), np.asarray(problem.batch.labels)
    params = jax.tree.map(np.asarray, problem.params)
    grad_seconds = torch_peer.time_torch_gradient(params, images, labels, "float32", args.repeats)
    seconds = torch_peer.time_backpack_diag_ggn_exact(params, images, labels, "float32", args.repeats)
    estimate = torch_peer.backpack_diag_ggn_exact(params, images, labels, "float32")
    rows = []
    runs = (("torch_gradient", grad_seconds, None), ("backpack_diag_ggn_exact", seconds, estimate))
    for name, times, output in runs:
        settings = {"framework": "torch", "jax_grad_equivalents": statistics.median(times) / jax_grad_seconds}
        row = make_row(problem, name, settings, times, statistics.median(grad_seconds))
        row["timed_runs"], row["temp_bytes"] = len(times), None
        row.update(quality(output, problem.reference, True))
        rows.append(row)

    exact64 = torch_peer.backpack_diag_ggn_exact(params, images.astype(np.float64), labels, "float64")
    flax_logits = jf.logits_fn_for(problem.model)(to_float64(params), jnp.asarray(images, jnp.float64))
    torch_logits = torch_peer.torch_logits(params, images.astype(np.float64), "float64")
    logits_diff = np.max(np.abs(np.asarray(flax_logits) - torch_logits))
    checks = {
        "cnn_torch_vs_flax_logits_max_abs_diff": float(logits_diff),
        **agreement("cnn_backpack_vs_ggn_naive_float64", exact64, problem.reference),
    }
    return rows, checks


def agreement(name: str, estimate, reference) -> dict[str, float]:
    """Max absolute difference and that difference relative to the largest reference entry."""
    diff = np.max(np.abs(flat(estimate) - flat(reference)))
    scale = np.max(np.abs(flat(reference)))
    return {f"{name}_max_abs_diff": float(diff), f"{name}_max_rel_diff": float(diff / scale)}


def layerwise_check(problem: Problem) -> dict[str, float]:
    """The fast layerwise GGN in float64 against the naive float64 reference."""
    run = lambda p, b: _ggn("layerwise")(problem.model, p, None, b, None)
    layerwise = jax.jit(run)(to_float64(problem.params), to_float64(problem.batch))
    return agreement(f"{problem.name}_ggn_layerwise_vs_naive_float64", layerwise, problem.reference)


# ----------------------------------------------------------------------------------------------------------
# Output.


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], checks: dict, console: Console, title: str = "") -> None:
    table = Table(title=title or f"Diagonal curvature estimators ({jax.devices()[0].platform})")
    columns = ("model", "estimator", "settings", "B", "products", "ms", "min ms", "runs", "grad-eq", "temp MB")
    for column in (*columns, "rel err", "stderr"):
        table.add_column(column, justify="left" if column in ("model", "estimator", "settings") else "right")
    for name in RECALL_FRACTIONS:
        table.add_column(name.removeprefix("recall"), justify="right")
    for row in rows:
        table.add_row(
            row["model"],
            row["estimator"],
            settings_text(row["settings"]),
            str(row["batch_size"]),
            _fmt(row.get("products"), "d"),
            _fmt(row["time_ms"], ".1f"),
            _fmt(row["min_time_ms"], ".1f"),
            str(row["timed_runs"]),
            _fmt(row["grad_equivalents"], ".1f"),
            _fmt(None if row["temp_bytes"] is None else row["temp_bytes"] / 2**20, ".1f"),
            _fmt(row["rel_error"], ".3g"),
            _fmt(row.get("stderr_rel"), ".3g"),
            *(_fmt(row[name], ".2f") for name in RECALL_FRACTIONS),
        )
    console.print(table)
    for name, value in checks.items():
        console.print(f"{name}: {value:.3g}")


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="curvature batch of the MLP and the CNN")
    parser.add_argument("--max-probes", type=int, default=16, help="cap on Hutchinson probes (1, 4, 16, 64, 256)")
    parser.add_argument("--same-budget", default="1,10", help="products per example for the same-budget rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per estimator, after one warm-up")
    parser.add_argument("--train-steps", type=int, default=300, help="Adam steps first (0: at init)")
    parser.add_argument("--time-budget-s", type=float, default=60.0, help="cap on timed runs' total per estimator")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="skip runs needing more temp memory")
    parser.add_argument("--resnet", action="store_true", help="add ResNet-18 costs (meant for a GPU)")
    parser.add_argument("--resnet-batch-size", type=int, default=128)
    parser.add_argument("--synthetic", action="store_true", help="random inputs and labels instead of the data sets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="the JSON file (default: see above)")
    parser.add_argument("--quick", action="store_true", help="smoke check; its timings mean nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_probes, args.repeats, args.train_steps = 8, 4, 2, 5
        args.resnet_batch_size = 8
    try:
        args.same_budget = [int(m) for m in args.same_budget.split(",") if m.strip()]
    except ValueError:
        parser.error(f"--same-budget {args.same_budget!r}: comma-separated integers, e.g. 1,10")
    if any(m < 1 for m in args.same_budget) or args.repeats < 1 or args.batch_size < 1:
        parser.error("--same-budget entries, --repeats and --batch-size must be at least 1")
    return args


def disable_backend_optimizations() -> None:
    """Compiles with XLA's backend optimizations off: compiling, not running, dominates a smoke run.

    Must run before JAX creates its backend (the first ``jax.devices()`` or computation).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={format(v, '.3g') if isinstance(v, float) else v}" for k, v in settings.items())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        disable_backend_optimizations()
    jax.config.update("jax_enable_x64", True)  # for the references; every estimator still runs in float32
    # Wide enough for the table when the output goes to a file or a pipe.
    console = Console(width=None if sys.stdout.isatty() else 180)
    device = jax.devices()[0].platform
    probe_counts = [k for k in PROBE_COUNTS if k <= args.max_probes]
    out = args.out or RESULTS_DIR / f"curvature-{device}{'-quick' if args.quick else ''}.json"

    console.log("training the MLP and computing its exact Hessian diagonal")
    mlp = trained_problem("mlp", args, "exact")
    console.log("training the CNN and computing its exact GGN (= Hessian) diagonal")
    cnn = trained_problem("cnn", args, "ggn")

    rows = compare_problem(mlp, estimators_for(mlp, probe_counts, exact=True), args, console)
    cnn_rows = compare_problem(cnn, estimators_for(cnn, probe_counts, exact=False), args, console)
    rows += cnn_rows
    same_budget = []
    for problem in (mlp, cnn):
        for products in args.same_budget:
            console.log(f"{problem.name}: every estimator at {products} products per example")
            same_budget += same_budget_rows(problem, products, args)
    checks = layerwise_check(cnn)
    if importlib.util.find_spec("torch") and importlib.util.find_spec("backpack"):
        console.log("cnn: BackPACK DiagGGNExact")
        peer_rows, peer_checks = backpack_rows(cnn, cnn_rows[0]["time_ms"] / 1e3, args)
        rows += peer_rows
        checks.update(peer_checks)
    else:
        console.log("torch or backpack-for-pytorch is not installed: no BackPACK comparison")
    if args.resnet:
        resnet = resnet_problem(args)
        chosen = [e for e in estimators_for(resnet, probe_counts, exact=False)
                  if e.name == "gradient" or (e.name == "hutchinson" and e.settings["probe_batch_size"] is None)
                  or (e.name == "ggn" and e.settings["method"] == "layerwise")
                  or (e.name == "gnb" and e.settings["num_samples"] == 1)]  # fmt: skip
        rows += compare_problem(resnet, chosen, args, console)

    print_table(rows, checks, console)
    print_table(same_budget, {}, console, title="The same budget: products per example held equal")
    payload = {
        "metadata": {
            "device": device,
            "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15_min": os.getloadavg(),  # other work on the machine inflates the timings
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]),
            "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
            "checks": checks,
        },
        "rows": rows,
        "same_budget_rows": same_budget,
    }
    write_json_atomic(out, payload)
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()
