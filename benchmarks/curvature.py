"""Benchmark of the diagonal curvature estimators: cost, memory and how well each one selects parameters.

For each model and estimator it records the median (and the fastest) of ``--repeats`` timed jitted runs
after a warm-up, the median in gradient-equivalents (divided by the median time of a jitted ``jax.grad``
of the same loss), the compiled temporary memory (``memory_analysis().temp_size_in_bytes``), the relative
error against an exact float64 diagonal and the top-k recall of that diagonal's largest (signed) entries
at k = 0.1%, 1% and 10% of the parameters.

Models:

- ``mlp``: the tanh MLP (hidden 50, 3,760 parameters) on scikit-learn's 8x8 digits; reference: the exact
  Hessian diagonal (``exact_diagonal``, one Hessian-vector product per parameter).
- ``cnn``: the paper's ReLU CNN (421,642 parameters) on real MNIST digits (``mnist5k``); reference: the exact
  GGN diagonal (``ggn_diagonal(method="naive")``), which equals the Hessian diagonal for a network that is
  piecewise linear in its parameters. BackPACK's ``DiagGGNExact`` runs beside it on the same weights and
  batch when ``torch`` and ``backpack-for-pytorch`` (the ``peers`` extra) are installed.
- ``resnet18`` (``--resnet``, meant for a GPU): random images, no reference; Hutchinson and GGN costs only.

The MLP and the CNN are first trained for ``--train-steps`` Adam steps, since the paper takes the Hessian at
the learned parameters. Estimators run in float32; the references in float64. Runs whose compiled temporary
memory exceeds ``--memory-limit-gb`` are compiled (their memory is reported) but not run; runs slower than
``--time-budget-s`` are timed fewer than ``--repeats`` times (each row records ``timed_runs``).

With jaxforget installed (``pip install -e .``), from the repository root::

    python benchmarks/curvature.py            # writes benchmarks/results/curvature-<device>.json
    python benchmarks/curvature.py --quick    # smoke check, writes curvature-<device>-quick.json
    python benchmarks/curvature.py --resnet --memory-limit-gb 100   # on a GPU
"""

from __future__ import annotations

import argparse
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
import optax
from rich.console import Console
from rich.table import Table

import jaxforget as jf
from jaxforget.atomic import write_json_atomic
from jaxforget.timing import time_runs

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
RECALL_FRACTIONS = {"recall@0.1%": 0.001, "recall@1%": 0.01, "recall@10%": 0.1}
PROBE_COUNTS = (1, 4, 16, 64, 256)
PROBE_BATCH_SIZE = 8
TRAIN_BATCH_SIZE = 128
LEARNING_RATE = 1e-3
EXACT_BASIS_BATCH_SIZE = 256
REFERENCE_EXAMPLE_BATCH_SIZE = 8  # bounds the float64 per-example gradients of the naive GGN reference

# fn(model, params, batch_stats, batch, key) -> a diagonal (or saliency) shaped like params.
EstimatorFn = Callable[[nn.Module, Any, Any, jf.Batch, jax.Array], Any]


class Problem(NamedTuple):
    """A model at fixed parameters with its curvature batch and (optionally) the exact float64 diagonal."""

    name: str
    model: nn.Module
    params: Any
    batch_stats: Any
    batch: jf.Batch
    reference: Any


class Estimator(NamedTuple):
    name: str
    settings: dict[str, Any]
    fn: EstimatorFn
    is_diagonal_estimate: bool = True  # False for saliencies whose scale is not that of diag(H)


# ----------------------------------------------------------------------------------------------------------
# Estimators, each a function of arrays only (the model is a static Python object).


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


def _gnb(num_samples: int) -> EstimatorFn:
    def run(model, params, batch_stats, batch, key):
        logits_fn = jf.logits_fn_for(model, batch_stats)
        return jf.gnb_diagonal(logits_fn, params, batch.inputs, key, num_samples=num_samples)

    return run


def _fisher(model, params, batch_stats, batch, key):
    del key
    return jf.fisher_diagonal(jf.loss_fn_for(model, batch_stats), params, batch)


def _saliency(model, params, batch_stats, batch, key):
    del key
    return jf.gradient_saliency(jf.loss_fn_for(model, batch_stats), params, batch)


def _exact(model, params, batch_stats, batch, key):
    del key
    loss_fn = jf.loss_fn_for(model, batch_stats)
    return jf.exact_diagonal(loss_fn, params, batch, basis_batch_size=EXACT_BASIS_BATCH_SIZE)


def hutchinson_estimators(probe_counts: list[int]) -> list[Estimator]:
    """Hutchinson with all probes vmapped at once and with ``PROBE_BATCH_SIZE`` probes at a time."""
    estimators = []
    for num_probes in probe_counts:
        for probe_batch_size in (None, PROBE_BATCH_SIZE):
            settings = {"num_probes": num_probes, "probe_batch_size": probe_batch_size}
            estimators.append(Estimator("hutchinson", settings, _hutchinson(num_probes, probe_batch_size)))
    return estimators


def common_estimators() -> list[Estimator]:
    """The Monte Carlo and exact Gauss-Newton diagonals and the two first-order saliencies."""
    return [
        Estimator("gnb", {"num_samples": 1}, _gnb(1)),
        Estimator("gnb", {"num_samples": 8}, _gnb(8)),
        Estimator("ggn", {"method": "layerwise"}, _ggn("layerwise")),
        Estimator("ggn", {"method": "naive"}, _ggn("naive")),
        Estimator("fisher", {}, _fisher),
        Estimator("gradient_saliency", {}, _saliency, is_diagonal_estimate=False),
    ]


# ----------------------------------------------------------------------------------------------------------
# Measurement.


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


def relative_error(estimate, reference) -> float:
    est, ref = flat(estimate), flat(reference)
    return float(np.linalg.norm(est - ref) / np.linalg.norm(ref))


def top_k_recall(estimate, reference, fraction: float) -> float:
    """Fraction of the reference's k largest entries that are among the estimate's k largest (global)."""
    est, ref = flat(estimate), flat(reference)
    k = max(1, round(fraction * ref.size))
    top = lambda v: np.argpartition(-v, k - 1)[:k]
    return len(np.intersect1d(top(est), top(ref))) / k


def quality(estimate, reference, is_diagonal_estimate: bool) -> dict[str, float | None]:
    """Relative error (for estimates of diag(H) only) and top-k recalls against ``reference``."""
    if reference is None or estimate is None:
        return {"rel_error": None, **dict.fromkeys(RECALL_FRACTIONS)}
    error = relative_error(estimate, reference) if is_diagonal_estimate else None
    recalls = {name: top_k_recall(estimate, reference, f) for name, f in RECALL_FRACTIONS.items()}
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


def benchmark_problem(problem: Problem, estimators: list[Estimator], args, console: Console) -> list[dict]:
    """A row for the gradient and one per estimator: timed in float32, scored against the reference."""
    call_args = (problem.params, problem.batch_stats, problem.batch, jax.random.key(args.seed))
    run = lambda fn: measure(fn, call_args, args.repeats, args.memory_limit_gb * 2**30, args.time_budget_s)
    grad = run(lambda *a: _gradient(problem.model, *a))
    grad_seconds = statistics.median(grad.seconds)
    rows = [scored_row(problem, Estimator("gradient", {}, _gradient), grad, grad_seconds, None)]
    for estimator in estimators:
        console.log(f"{problem.name}: {estimator.name} {estimator.settings}")
        result = run(lambda *a, e=estimator: e.fn(problem.model, *a))
        rows.append(scored_row(problem, estimator, result, grad_seconds, problem.reference))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Problems.


def to_float64(tree):
    """Floating-point leaves cast to float64; integer leaves (labels) kept."""
    cast = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree)


def train(model: nn.Module, params, data: jf.Batch, steps: int, seed: int):
    """``steps`` Adam steps of the mean cross-entropy on random minibatches of ``data``."""
    optimizer = optax.adam(LEARNING_RATE)

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(jf.loss_fn_for(model))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    opt_state = optimizer.init(params)
    for _ in range(steps):
        index = rng.choice(len(data.labels), TRAIN_BATCH_SIZE, replace=False)
        params, opt_state = step(params, opt_state, jf.Batch(data.inputs[index], data.labels[index]))
    return params


def trained_problem(name: str, model: nn.Module, dataset: str, args, reference: EstimatorFn) -> Problem:
    """``model`` trained on ``dataset``, a curvature batch of ``--batch-size`` examples and the float64
    ``reference`` diagonal on it."""
    data = jf.embedded_dataset(dataset)
    params = jf.init_model(model, jax.random.key(args.seed), (1, *data.inputs.shape[1:]))["params"]
    params = train(model, params, data, args.train_steps, args.seed)
    index = np.random.default_rng(args.seed + 1).permutation(len(data.labels))[: args.batch_size]
    batch = jf.Batch(jnp.asarray(data.inputs[index]), jnp.asarray(data.labels[index]))
    run = lambda p, b: reference(model, p, None, b, None)
    # Blocks, so that the reference's compute does not land in the first timed run (dispatch is asynchronous).
    exact = jax.block_until_ready(jax.jit(run)(to_float64(params), to_float64(batch)))
    return Problem(name, model, params, None, batch, exact)


def resnet_problem(args) -> Problem:
    """ResNet-18 at initialization on random normal 32x32x3 images and random labels."""
    model = jf.ResNet18()
    image_key, label_key, init_key = jax.random.split(jax.random.key(args.seed), 3)
    shape = (args.resnet_batch_size, 32, 32, 3)
    variables = jf.init_model(model, init_key, shape)
    batch = jf.Batch(
        jax.random.normal(image_key, shape, jnp.float32),
        jax.random.randint(label_key, (shape[0],), 0, 10, jnp.int32),
    )
    return Problem("resnet18", model, variables["params"], variables["batch_stats"], batch, None)


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


def print_table(rows: list[dict], checks: dict, console: Console) -> None:
    table = Table(title=f"Diagonal curvature estimators ({jax.devices()[0].platform})")
    for column in ("model", "estimator", "settings", "B", "ms", "min ms", "runs", "grad-eq", "temp MB", "rel err"):
        table.add_column(column, justify="left" if column in ("model", "estimator", "settings") else "right")
    for name in RECALL_FRACTIONS:
        table.add_column(name.removeprefix("recall"), justify="right")
    for row in rows:
        table.add_row(
            row["model"],
            row["estimator"],
            settings_text(row["settings"]),
            str(row["batch_size"]),
            _fmt(row["time_ms"], ".1f"),
            _fmt(row["min_time_ms"], ".1f"),
            str(row["timed_runs"]),
            _fmt(row["grad_equivalents"], ".1f"),
            _fmt(None if row["temp_bytes"] is None else row["temp_bytes"] / 2**20, ".1f"),
            _fmt(row["rel_error"], ".3g"),
            *(_fmt(row[name], ".2f") for name in RECALL_FRACTIONS),
        )
    console.print(table)
    for name, value in checks.items():
        console.print(f"{name}: {value:.3g}")


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="curvature batch of the MLP and the CNN")
    parser.add_argument("--max-probes", type=int, default=PROBE_COUNTS[-1], help="cap on Hutchinson probes")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per estimator, after one warm-up")
    parser.add_argument("--train-steps", type=int, default=300, help="Adam steps first (0: at init)")
    parser.add_argument("--time-budget-s", type=float, default=60.0, help="cap on timed runs' total per estimator")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="skip runs needing more temp memory")
    parser.add_argument("--resnet", action="store_true", help="add ResNet-18 costs (meant for a GPU)")
    parser.add_argument("--resnet-batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke check; its timings mean nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_probes, args.repeats, args.train_steps = 8, 4, 2, 5
        args.resnet_batch_size = 8
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
    console = Console(width=None if sys.stdout.isatty() else 160)
    device = jax.devices()[0].platform
    probe_counts = [k for k in PROBE_COUNTS if k <= args.max_probes]

    console.log("training the MLP and computing its exact Hessian diagonal")
    mlp = trained_problem("mlp", jf.MLP(hidden=(50,), activation="tanh"), "digits", args, _exact)
    console.log("training the CNN and computing its exact GGN (= Hessian) diagonal")
    cnn_reference = _ggn("naive", example_batch_size=REFERENCE_EXAMPLE_BATCH_SIZE)
    cnn = trained_problem("cnn", jf.CNN(), "mnist5k", args, cnn_reference)

    exact = Estimator("exact_diagonal", {"basis_batch_size": EXACT_BASIS_BATCH_SIZE}, _exact)
    hutchinson = hutchinson_estimators(probe_counts)
    rows = benchmark_problem(mlp, [exact, *hutchinson, *common_estimators()], args, console)
    cnn_rows = benchmark_problem(cnn, [*hutchinson, *common_estimators()], args, console)
    rows += cnn_rows
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
        resnet_estimators = [
            *hutchinson,
            Estimator("ggn", {"method": "layerwise"}, _ggn("layerwise")),
            Estimator("gnb", {"num_samples": 1}, _gnb(1)),
        ]
        rows += benchmark_problem(resnet, resnet_estimators, args, console)

    print_table(rows, checks, console)
    payload = {
        "metadata": {
            "device": device,
            "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15_min": os.getloadavg(),  # other work on the machine inflates the timings
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]),
            "args": vars(args),
            "checks": checks,
        },
        "rows": rows,
    }
    path = RESULTS_DIR / f"curvature-{device}{'-quick' if args.quick else ''}.json"
    write_json_atomic(path, payload)
    console.log(f"wrote {path}")


if __name__ == "__main__":
    main()
