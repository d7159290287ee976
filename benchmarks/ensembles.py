"""Benchmark of ensembles: K models trained together as one vmapped program against K separate single-model runs.

For each model family (the main job's MLP on ``digits`` and its CNN on ``mnist5k``, built as ``pipeline.setup`` builds
them: ``MLP(hidden=(256,), activation="relu")`` and ``CNN()``, 10 classes; trained on the data set's ``"train"`` split
with Adam at 1e-3 and batches of 64, the train stage's defaults) and each K it records:

- ``together``: :func:`jaxforget.ensembles.train_stacked` with a jitted ``indexed_train_step`` (vmapped over the
  models) for ``--steps`` steps per model, K models from seeds 0..K-1; its ``s_per_model`` is the timed run's
  seconds over K. The step's compilation (``lower().compile()``) is timed separately, and a one-step warm-up run
  precedes the timed run. ``together_unrolled``: the same with ``unrolled=True`` (K single-model steps written into
  one program), for K up to ``--unrolled-max-k``, since its compile time grows with K.
- ``separate``: the train stage's single-model path (``jax.jit(train.train_step)``, ``data.batches`` on the host,
  ``train.fit``), timed for ``--separate-runs`` seeds after the same compile and warm-up, one after the other in
  this process. K separate runs are *extrapolated* as K times their mean (each run is independent and costs the
  same), so ``separate_s_per_model`` is that mean, and ``speedup`` (``speedup_unrolled``) is its ratio to the
  together (unrolled) seconds per model. The separate path gathers each batch on the host and copies it to the
  device, as the train stage does; the together path gathers on the device from the indices, so at K = 1 the
  difference is the data pipeline's.

Initialization (jitted, compile included) is recorded as ``init_s`` for both. Other work on the machine inflates the
timings: the load average before and after is recorded. With jaxforget installed, from the repository root::

    python benchmarks/ensembles.py                  # K = 1, 8, 32, 64 for both models (a GPU, or a long CPU run)
    python benchmarks/ensembles.py --device-check   # the same grid sized for under 5 minutes on one GPU
    python benchmarks/ensembles.py --quick          # smoke check (K = 1, 2; 3 steps); its timings mean nothing

Each run writes ``benchmarks/results/ensembles-<backend>.json`` (``-quick`` appended for ``--quick``), atomically.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import statistics
import time
from typing import Any

import jax
import numpy as np
import optax

from jaxforget import data, ensembles, models, train
from jaxforget.atomic import write_json_atomic
from jaxforget.timing import benchmark_metadata

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
FULL_GRID = (1, 8, 32, 64)
FAMILIES = {"mlp": "digits", "cnn": "mnist5k"}  # model -> data set, as in the issue


def build_model(name: str, num_classes: int):
    """The model as ``pipeline.setup`` builds it."""
    if name == "mlp":
        return models.MLP(num_classes=num_classes, hidden=(256,), activation="relu")
    return models.CNN(num_classes=num_classes)


def _timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def time_together(model, training: models.Batch, k: int, args: argparse.Namespace, unrolled: bool) -> dict[str, float]:
    """Seconds to initialize, compile and train K stacked models for ``args.steps`` steps."""
    seeds = list(range(k))
    tx = optax.adam(args.learning_rate)
    input_shape = (1, *training.inputs.shape[1:])
    init = jax.jit(ensembles.create_stacked_states, static_argnums=(0, 2, 3))
    init_s, state = _timed(lambda: init(model, ensembles.keys_for_seeds(seeds), input_shape, tx))
    index = next(ensembles.stacked_batch_indices(len(training.labels), args.batch_size, seeds))
    on_device = jax.device_put(training)
    jitted = jax.jit(functools.partial(ensembles.indexed_train_step, unrolled=unrolled))
    compile_s, step = _timed(lambda: jitted.lower(state, on_device, index).compile())

    def run(num_steps):
        return ensembles.train_stacked(state, training, args.batch_size, seeds, step, num_steps=num_steps)

    _timed(lambda: run(1))  # warm-up: first transfers
    train_s, (_, history) = _timed(lambda: run(args.steps))
    return {
        "init_s": init_s,
        "compile_s": compile_s,
        "train_s": train_s,
        "s_per_model": train_s / k,
        "final_loss_mean": float(np.mean(history["loss"][-1])),
    }


def time_separate(model, training: models.Batch, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per single-model run (the train stage's path) over ``args.separate_runs`` seeds."""
    tx = optax.adam(args.learning_rate)
    input_shape = (1, *training.inputs.shape[1:])
    init = jax.jit(lambda key: train.create_train_state(model, key, input_shape, tx))
    init_s, state = _timed(lambda: init(jax.random.key(0)))
    first = next(data.batches(training, args.batch_size, seed=0))
    compile_s, step = _timed(lambda: jax.jit(train.train_step).lower(state, first).compile())
    epochs = math.ceil(args.steps / (len(training.labels) // args.batch_size))

    def run(seed, num_steps):
        start = init(jax.random.key(seed))
        stream = data.batches(training, args.batch_size, seed=seed, epochs=epochs)
        return train.fit(start, stream, step, num_steps=num_steps, progress=False)

    _timed(lambda: run(0, 1))  # warm-up
    runs = [_timed(lambda seed=seed: run(seed, args.steps))[0] for seed in range(args.separate_runs)]
    return {"init_s": init_s, "compile_s": compile_s, "run_s": runs, "s_per_model": statistics.mean(runs)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlp-ks", type=int, nargs="*", default=list(FULL_GRID), help="K values for the MLP")
    parser.add_argument("--cnn-ks", type=int, nargs="*", default=list(FULL_GRID), help="K values for the CNN")
    parser.add_argument("--steps", type=int, default=100, help="training steps per model")
    parser.add_argument("--unrolled-max-k", type=int, default=8, help="also time the unrolled step up to this K")
    parser.add_argument("--separate-runs", type=int, default=3, help="single-model runs timed (then extrapolated)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--note", default="", help="recorded in the JSON: e.g. why sizes were skipped")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="JSON path (default: results/...)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke check: K = 1, 2, 3 steps; timings mean nothing")
    mode.add_argument("--device-check", action="store_true", help="the full grid, sized for < 5 min on one GPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.mlp_ks, args.cnn_ks, args.steps, args.separate_runs = [1, 2], [1, 2], 3, 1
    if args.device_check:
        args.mlp_ks, args.cnn_ks, args.steps, args.separate_runs = list(FULL_GRID), list(FULL_GRID), 200, 3
    for name in ("steps", "separate_runs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(k < 1 for k in args.mlp_ks + args.cnn_ks):
        parser.error("every K in --mlp-ks and --cnn-ks must be at least 1")
    return args


# The printed table: (heading, width) per column; times per model and step.
COLUMNS = (
    ("model", 5),
    ("K", 4),
    ("s/step/model: vmapped", 23),
    ("unrolled", 10),
    ("separate", 10),
    ("speedup: vmapped", 18),
    ("unrolled", 10),
    ("compile s: vmapped", 20),
    ("unrolled", 10),
    ("single", 8),
)


def _line(cells: list[str]) -> str:
    return "".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row_line(row: dict) -> str:
    unrolled = row["together_unrolled"] or {}
    per_step = [row["together"]["s_per_model"], unrolled.get("s_per_model"), row["separate_s_per_model"]]
    return _line(
        [
            row["model"],
            str(row["k"]),
            *[_number(None if x is None else x / row["steps"], 5) for x in per_step],
            _number(row["speedup"], 2),
            _number(row["speedup_unrolled"], 2),
            _number(row["together"]["compile_s"], 2),
            _number(unrolled.get("compile_s"), 2),
            _number(row["separate_compile_s"], 2),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backend = jax.default_backend()
    load_before = os.getloadavg()
    rows, separate_runs, skipped = [], {}, []
    print(_line([heading for heading, _ in COLUMNS]), flush=True)
    for name, ks in (("mlp", args.mlp_ks), ("cnn", args.cnn_ks)):
        skipped += [{"model": name, "k": k} for k in FULL_GRID if k not in ks]
        if not ks:
            continue
        training = data.load(FAMILIES[name], "train")
        model = build_model(name, int(training.labels.max()) + 1)
        separate = separate_runs[name] = time_separate(model, training, args)
        for k in ks:
            together = time_together(model, training, k, args, unrolled=False)
            unrolled = time_together(model, training, k, args, unrolled=True) if k <= args.unrolled_max_k else None
            row = {
                "model": name,
                "dataset": FAMILIES[name],
                "k": k,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "together": together,
                "together_unrolled": unrolled,
                "separate_s_per_model": separate["s_per_model"],
                "separate_compile_s": separate["compile_s"],
                "separate_k_runs_s_extrapolated": k * separate["s_per_model"],
                "speedup": separate["s_per_model"] / together["s_per_model"],
                "speedup_unrolled": None if unrolled is None else separate["s_per_model"] / unrolled["s_per_model"],
            }
            rows.append(row)
            print(_row_line(row), flush=True)
    payload = {
        "metadata": {
            "backend": backend,
            "device_count": jax.device_count(),
            **benchmark_metadata(args, load_before),
            "separate_runs_extrapolated": (
                f"K separate runs = K x the mean of {args.separate_runs} timed single-model runs (seeds 0..), "
                "run one after the other in this process with one compiled step"
            ),
            "skipped": skipped,
            "note": args.note,
        },
        "rows": rows,
        "separate_runs": separate_runs,
    }
    suffix = "-quick" if args.quick else ""
    path = args.output or RESULTS_DIR / f"ensembles-{backend}{suffix}.json"
    write_json_atomic(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
