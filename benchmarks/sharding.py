"""Benchmark of data parallelism: the curvature estimators on a batch split over 1, 2, 4 and 8 devices, and the
global selection on FSDP-split scores; time, compiled memory per device, gathers, and agreement with one device.

Each device count runs in its own subprocess (JAX fixes its devices at start-up). On CPU the devices are forced host
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) that share the machine's cores: they show placement,
memory per device and agreement, not speed-up. On an accelerator the first N real devices are used, and a count
above the number available is skipped (recorded under ``skipped``).

Per device count, with the paper's CNN (``--size full``: ``CNN()``, 421,642 float32 parameters, a batch of 256
28x28x1 inputs; ``--size tiny``: ``CNN(features=(4, 8), hidden=16)`` on 16 8x8 inputs, a smoke check whose timings
mean nothing), parameters replicated (:func:`jaxforget.sharding.replicate`) and the batch split over a ``"data"``
mesh (:func:`jaxforget.sharding.shard_batch`), each jitted function is compiled (``lower().compile()``, timed),
run once to warm up, then timed (median of up to ``--repeats`` runs, each to ``block_until_ready``, within
``--budget-s`` seconds per function; the defaults, 2 runs and 10 s, keep the full run on 2 CPU cores near 5
minutes):

- ``hutchinson``: ``hutchinson_diagonal`` with ``--probes`` Rademacher probes (all at once);
- ``ggn``: the exact GGN diagonal ``ggn_diagonal`` (layerwise); ``gnb``: ``gnb_diagonal`` with one label per
  example; ``fisher``: ``fisher_diagonal`` (per-example gradients by ``vmap``);
- ``select_top``: ``select_top(scores, 0.01)`` over all leaves, the scores (the GGN diagonal) split FSDP-style
  (:func:`jaxforget.sharding.shard_params`).

Each row records ``memory_per_device_bytes``: the compiled executable's ``memory_analysis()`` for one device,
``argument + output + temp`` bytes (this device's shards of the inputs, its outputs, and XLA's peak scratch space;
a static estimate that counts donated or aliased buffers twice, not a measured high-water mark), ``all_gathers`` (the
``all-gather`` ops in the optimized HLO) and ``parameter_sized_all_gathers`` (those whose result has as many entries
as some parameter leaf: a gathered weight or score), and ``max_relative_difference`` from the one-device result (max
absolute difference over max magnitude, every leaf; masks: the fraction of entries that differ), when 1 is among
the counts.

With jaxforget installed, from the repository root::

    python benchmarks/sharding.py                          # 1, 2, 4, 8 devices, full size
    python benchmarks/sharding.py --size tiny --devices 1,2 --out /tmp/sharding.json   # smoke check, seconds

The default output is ``benchmarks/results/sharding-cpu.json`` on CPU and ``sharding-<platform>.json`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
SIZES = {  # model widths, input shape, number of Hutchinson probes
    "full": {"features": (32, 64), "hidden": 128, "input_shape": (256, 28, 28, 1), "probes": 8},
    "tiny": {"features": (4, 8), "hidden": 16, "input_shape": (16, 8, 8, 1), "probes": 2},
}
FUNCTIONS = ("hutchinson", "ggn", "gnb", "fisher", "select_top")
NOTES = [
    "Forced host devices on CPU share the machine's cores (2 here): more devices split the work but add "
    "partitioning overhead, so the CPU timings show no speed-up; they check placement, memory and agreement.",
    "memory_per_device_bytes = argument + output + temp bytes of one device from the compiled executable's "
    "memory_analysis(): a static estimate (aliased buffers counted twice), not a measured high-water mark.",
    "fisher on this CNN with a split batch: XLA (jax 0.10.2) returns zero per-example conv-kernel gradients "
    "(vmap of grad, a grouped convolution) for the examples off the first device; see max_relative_difference.",
    "ggn and gnb (layerwise) all-gather activation-sized arrays (the whole batch's conv patches and output signals: "
    "their loop over examples dynamic-slices the split example axis), so their temp memory per device stops "
    "shrinking past 2 devices; hutchinson gathers conv activations of its probe-vmapped passes. None of these "
    "gathers is parameter-sized, and select_top has none at all.",
    "CPU defaults: --repeats 2 and --budget-s 10 (a function slower than 10 s is timed by its warm-up run alone, "
    "timed_runs = 0), to keep the full run near 5 minutes on 2 shared cores.",
]


# ----------------------------------------------------------------------------------------------------------------
# One device count, in a subprocess.


def _gathers(hlo: str, sizes: set[int]) -> tuple[int, int]:
    """(all-gather ops, those whose result has as many entries as some parameter leaf) in optimized HLO text."""
    total = sized = 0
    for match in re.finditer(r"= \(?\w+\[([\d,]*)\][^=\n]*? all-gather(?:-start)?\(", hlo):
        total += 1
        entries = 1
        for dim in filter(None, match.group(1).split(",")):
            entries *= int(dim)
        sized += entries in sizes
    return total, sized


def run_worker(count: int, size: str, repeats: int, budget_s: float, arrays_path: str) -> dict[str, Any]:
    """Times every function on ``count`` devices; writes the results' arrays to ``arrays_path`` (npz)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxforget as jf
    from jaxforget import sharding
    from jaxforget.timing import time_runs

    available = len(jax.devices())
    if count > available:
        return {"device_count": count, "skipped": f"{available} {jax.default_backend()} devices available"}
    config = SIZES[size]
    model = jf.CNN(features=config["features"], hidden=config["hidden"])
    shape = config["input_shape"]
    params = jax.jit(lambda key: jf.init_model(model, key, (1, *shape[1:])))(jax.random.key(0))["params"]
    batch = jf.Batch(
        jax.random.normal(jax.random.key(1), shape, jnp.float32),
        jax.random.randint(jax.random.key(2), shape[:1], 0, 10),
    )
    logits_fn, loss_fn = jf.logits_fn_for(model), jf.loss_fn_for(model)
    mesh = sharding.data_mesh(jax.devices()[:count])
    params, batch = sharding.replicate(params, mesh), sharding.shard_batch(batch, mesh)
    key = jax.random.key(3)
    sizes = {leaf.size for leaf in jax.tree.leaves(params)}
    functions = {
        "hutchinson": lambda p, b, k: jf.hutchinson_diagonal(loss_fn, p, b, k, num_probes=config["probes"]),
        "ggn": lambda p, b, k: jf.ggn_diagonal(logits_fn, p, b.inputs),
        "gnb": lambda p, b, k: jf.gnb_diagonal(logits_fn, p, b.inputs, k),
        "fisher": lambda p, b, k: jf.fisher_diagonal(loss_fn, p, b),
    }
    rows, arrays = [], {}

    def measure(name, fn, args):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
        times, warm_up, output = time_runs(compiled, args, repeats=repeats, budget_s=budget_s)
        memory = compiled.memory_analysis()
        parts = {
            "argument": memory.argument_size_in_bytes,
            "output": memory.output_size_in_bytes,
            "temp": memory.temp_size_in_bytes,
        }
        all_gathers, sized = _gathers(compiled.as_text(), sizes)
        rows.append(
            {
                "function": name,
                "device_count": count,
                "seconds": statistics.median(times) if times else warm_up,
                "timed_runs": len(times),
                "compile_s": compile_s,
                "memory_per_device_bytes": sum(parts.values()),
                "memory_bytes": parts,
                "all_gathers": all_gathers,
                "parameter_sized_all_gathers": sized,
                "output_replicated": all(
                    leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(output) if leaf.ndim
                ),
            }
        )
        for i, leaf in enumerate(jax.tree.leaves(output)):
            arrays[f"{name}/{i}"] = np.asarray(leaf)
        return output

    scores = None
    for name, fn in functions.items():
        out = measure(name, fn, (params, batch, key))
        scores = out if name == "ggn" else scores
    measure("select_top", lambda s: jf.select_top(s, 0.01), (sharding.shard_params(scores, mesh),))
    np.savez(arrays_path, **arrays)
    return {
        "device_count": count,
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_params": sum(leaf.size for leaf in jax.tree.leaves(params)),
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------------
# The driver: one subprocess per device count, then the comparison with one device.


def _start(count: int, args: argparse.Namespace, folder: pathlib.Path) -> subprocess.Popen:
    """Starts the worker for ``count`` devices, its output going to ``folder``."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}".strip()}
    if args.size == "tiny":  # workers run at once: none may take most of an accelerator's memory up front
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    command = [sys.executable, __file__, "--worker", str(count), "--size", args.size, "--repeats", str(args.repeats)]
    command += ["--budget-s", str(args.budget_s), "--worker-out", str(folder / f"{count}.json")]
    command += ["--worker-arrays", str(folder / f"{count}.npz")]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_counts(counts: list[int], args: argparse.Namespace, folder: pathlib.Path) -> list[dict[str, Any]]:
    """The workers' results, in the order of ``counts``. Full size runs one worker at a time, so that the timings
    do not compete; tiny ones (a smoke check whose timings mean nothing) all at once, to overlap their compiles."""
    results = []
    waves = [counts] if args.size == "tiny" else [[count] for count in counts]
    for wave in waves:
        workers = [(count, _start(count, args, folder)) for count in wave]
        for count, worker in workers:
            _, stderr = worker.communicate()
            if worker.returncode:
                raise RuntimeError(f"the {count}-device run failed:\n{stderr[-4000:]}")
            results.append(json.loads((folder / f"{count}.json").read_text()))
    return results


def _differences(reference: pathlib.Path, other: pathlib.Path) -> dict[str, float]:
    """Per function, the largest relative difference of ``other``'s arrays from ``reference``'s."""
    import numpy as np

    ref, got = np.load(reference), np.load(other)
    worst: dict[str, float] = {}
    for name in ref.files:
        function = name.split("/")[0]
        a, b = ref[name], got[name]
        if a.dtype == bool:
            diff = float(np.mean(a != b))
        else:
            diff = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))
        worst[function] = max(worst.get(function, 0.0), diff)
    return worst


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts (default 1,2,4,8)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: the paper's CNN, batch 256")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default: results/sharding-...)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per function after the warm-up")
    parser.add_argument("--budget-s", type=float, default=10.0, help="stop timing a function after this many s")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-arrays", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.device_counts = [int(c) for c in args.devices.split(",")]
    except ValueError:
        parser.error(f"--devices must be comma-separated integers, e.g. 1,2,4,8; got {args.devices!r}")
    if not args.device_counts or min(args.device_counts) < 1:
        parser.error(f"--devices needs counts of at least 1; got {args.devices!r}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        result = run_worker(args.worker, args.size, args.repeats, args.budget_s, args.worker_arrays)
        pathlib.Path(args.worker_out).write_text(json.dumps(result))
        return
    load_before = os.getloadavg()
    runs, skipped = [], []
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        for count, run in zip(args.device_counts, _run_counts(args.device_counts, args, folder), strict=True):
            if "skipped" in run:
                skipped.append(run)
                print(f"{count} devices: skipped ({run['skipped']})", flush=True)
                continue
            if count != 1 and 1 in args.device_counts and (folder / "1.npz").exists():
                worst = _differences(folder / "1.npz", folder / f"{count}.npz")
                for row in run["rows"]:
                    row["max_relative_difference"] = worst[row["function"]]
            for row in run["rows"]:
                print(
                    f"{count} devices {row['function']:>10}: {row['seconds']:.4f} s, compile {row['compile_s']:.1f} s, "
                    f"{row['memory_per_device_bytes'] / 2**20:.1f} MiB/device, "
                    f"{row['parameter_sized_all_gathers']} parameter-sized all-gathers, "
                    f"diff {row.get('max_relative_difference', 0.0):.2g}",
                    flush=True,
                )
            runs.append(run)

    # The parent initializes JAX only now, after the workers, so that it holds no accelerator memory while they run.
    import jax

    from jaxforget.atomic import write_json_atomic
    from jaxforget.timing import benchmark_metadata

    platform = runs[0]["platform"] if runs else jax.default_backend()
    payload = {
        "metadata": {
            "platform": platform,
            "size": args.size,
            "model": {k: v for k, v in SIZES[args.size].items()},
            "num_params": runs[0]["num_params"] if runs else None,
            **benchmark_metadata(args, load_before),
            "notes": NOTES,
            "skipped": skipped,
        },
        "rows": [row for run in runs for row in run["rows"]],
    }
    path = args.out or RESULTS_DIR / f"sharding-{platform}.json"
    write_json_atomic(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
