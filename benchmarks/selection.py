"""Benchmark of parameter selection at scale: time and compiled memory of a top-k mask over large pytrees.

For each size (1M, 10M and 100M float32 scores by default, split into ``--leaves`` leaves of uneven sizes, like
a network's kernels and biases) it records, per method, the median of ``--repeats`` jitted runs after a warm-up,
the compile time, and the compiled temporary memory (``memory_analysis().temp_size_in_bytes``) relative to the
bytes of the scores. Methods:

- ``select_top``: ``jf.select_top(scores, fraction)``, global (the library's bitwise bisection).
- ``select_top_per_layer``: the same with ``per_layer=True``.
- ``select_top_ties``: global, on scores rounded to one decimal, so that the budget ends inside a large tie and
  the second (flat-index) bisection runs: the worst case.
- ``select_random``: ``jf.select_random(params, fraction, key)``, global, the random draw included.
- ``lax.top_k``, ``argsort``, ``sort_threshold`` (with ``--compare``, global only): the alternatives the
  library's method was chosen against, each on the concatenated scores and scattered or compared back into a
  mask: ``jax.lax.top_k`` (ties to the lower index), a stable ``jnp.argsort`` (exact with ties), and
  ``jnp.sort`` for the k-th value followed by a comparison (inexact with ties; a lower bound on a sort-based
  method's cost).

Runs slower than ``--time-budget-s`` are timed fewer than ``--repeats`` times (each row records ``timed_runs``).
Other processes on the machine inflate the timings; the load average before and after is recorded.

With jaxforget installed (``pip install -e .``), from the repository root::

    python benchmarks/selection.py              # writes benchmarks/results/selection-<device>.json
    python benchmarks/selection.py --quick      # smoke check, writes selection-<device>-quick.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxforget.atomic import write_json_atomic
from jaxforget.selection import select_random, select_top
from jaxforget.timing import benchmark_metadata, time_runs

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# Relative leaf sizes: a few large kernels and small biases, as in a network.
LEAF_WEIGHTS = (0.002, 0.2, 0.0005, 0.3, 0.001, 0.25, 0.0005, 0.2, 0.001, 0.045)


def leaf_sizes(total: int, num_leaves: int) -> list[int]:
    """``num_leaves`` sizes summing to ``total``, in the proportions of ``LEAF_WEIGHTS`` (cycled)."""
    weights = np.resize(np.asarray(LEAF_WEIGHTS), num_leaves)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(int)
    sizes[int(np.argmax(sizes))] += total - sizes.sum()
    return sizes.tolist()


def make_scores(sizes: list[int], seed: int) -> dict[str, jax.Array]:
    """Standard normal float32 scores, one draw for all leaves (a random kernel per leaf compiles slowly)."""

    def draw(key):
        flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
        return {f"leaf{i:02d}": piece for i, piece in enumerate(pieces)}

    return jax.block_until_ready(jax.jit(draw)(jax.random.key(seed)))


# ----------------------------------------------------------------------------------------------------------------
# Methods: fn(scores, key) -> boolean mask (a pytree, or one flat array for the alternatives).


def _flat(scores: dict[str, jax.Array]) -> jax.Array:
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(scores)])


def _top_k_mask(scores, fraction):
    flat = _flat(scores)
    k = round(fraction * flat.size)
    return jnp.zeros(flat.size, bool).at[jax.lax.top_k(flat, k)[1]].set(True)


def _argsort_mask(scores, fraction):
    flat = _flat(scores)
    k = round(fraction * flat.size)
    return jnp.zeros(flat.size, bool).at[jnp.argsort(-flat, stable=True)[:k]].set(True)


def _sort_threshold_mask(scores, fraction):
    flat = _flat(scores)
    k = round(fraction * flat.size)
    return flat >= jnp.sort(flat)[flat.size - k]


def methods(fraction: float, compare: bool) -> dict[str, Callable[[Any, jax.Array], Any]]:
    table = {
        "select_top": lambda s, key: select_top(s, fraction),
        "select_top_per_layer": lambda s, key: select_top(s, fraction, per_layer=True),
        "select_top_ties": lambda s, key: select_top(jax.tree.map(lambda x: jnp.round(x, 1), s), fraction),
        "select_random": lambda s, key: select_random(s, fraction, key),
    }
    if compare:
        table["lax.top_k"] = lambda s, key: _top_k_mask(s, fraction)
        table["argsort"] = lambda s, key: _argsort_mask(s, fraction)
        table["sort_threshold"] = lambda s, key: _sort_threshold_mask(s, fraction)
    return table


# ----------------------------------------------------------------------------------------------------------------


def measure(fn: Callable, args: tuple, repeats: int, budget_s: float) -> dict[str, Any]:
    """Compiles ``fn`` for ``args``, runs it once to warm up, then times up to ``repeats`` runs.

    Timed runs stop once warm-up and timed runs together have taken ``budget_s``; a run whose warm-up alone takes
    that long is reported from the warm-up.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    temp_bytes = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    times, warm_up, output = time_runs(compiled, args, repeats=repeats, budget_s=budget_s)
    selected = sum(int(jnp.sum(leaf)) for leaf in jax.tree.leaves(output))
    return {
        "seconds": statistics.median(times) if times else warm_up,
        "timed_runs": len(times),
        "compile_s": compile_s,
        "temp_bytes": temp_bytes,
        "selected": selected,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="total scores per tree")
    parser.add_argument("--leaves", type=int, default=10, help="leaves per tree")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of entries selected")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, after one warm-up")
    parser.add_argument("--time-budget-s", type=float, default=60.0, help="cap on timed runs' total per method")
    parser.add_argument("--compare", action="store_true", help="also time lax.top_k, argsort and sort")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="JSON path (default: results/...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke check; its timings mean nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [1e4, 1e5], 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = jax.devices()[0].platform
    load_before = os.getloadavg()
    rows = []
    for total in (int(size) for size in args.sizes):
        sizes = leaf_sizes(total, args.leaves)
        scores = make_scores(sizes, args.seed)
        scores_bytes = 4 * total
        for name, fn in methods(args.fraction, args.compare).items():
            result = measure(fn, (scores, jax.random.key(args.seed)), args.repeats, args.time_budget_s)
            temp = result["temp_bytes"]
            row = {
                "method": name,
                "num_params": total,
                "num_leaves": len(sizes),
                "fraction": args.fraction,
                **result,
                "temp_over_scores": None if temp is None else temp / scores_bytes,
            }
            rows.append(row)
            print(
                f"{name:22s} n={total:>11,d}  {row['seconds']:8.3f} s  compile {row['compile_s']:6.2f} s  "
                f"temp {row['temp_over_scores']:.2f}x scores  selected {row['selected']:,d}",
                flush=True,
            )
        del scores
    payload = {
        "metadata": {"device": device, **benchmark_metadata(args, load_before)},
        "rows": rows,
    }
    path = args.output or RESULTS_DIR / f"selection-{device}{'-quick' if args.quick else ''}.json"
    write_json_atomic(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
