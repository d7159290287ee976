"""Wall-clock timing of jitted or compiled JAX functions, for benchmarks and reports (never asserted in tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["time_runs"]


def time_runs(fn: Callable, args: tuple, *, repeats: int, budget_s: float = float("inf")) -> tuple[list, float, Any]:
    """Runs ``fn(*args)`` once to warm up, then times up to ``repeats`` runs, each to ``block_until_ready``.

    Timed runs stop once the warm-up and the timed runs together have taken ``budget_s`` seconds.

    Returns:
      ``(times, warm_up, output)``: the timed runs' seconds (possibly fewer than ``repeats``, or none), the warm-up's
      seconds (compilation included when ``fn`` is only jitted) and the last output.
    """
    start = time.perf_counter()
    output = jax.block_until_ready(fn(*args))
    warm_up = time.perf_counter() - start
    times = []
    while len(times) < repeats and warm_up + sum(times) < budget_s:
        start = time.perf_counter()
        output = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times, warm_up, output
