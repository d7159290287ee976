"""Wall-clock timing of jitted or compiled JAX functions, for benchmarks and reports (never asserted in tests)."""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["benchmark_metadata", "time_runs"]


def benchmark_metadata(args: argparse.Namespace, load_before: tuple[float, float, float]) -> dict[str, Any]:
    """What every benchmark's JSON records about the run: the device, the versions, the command line and its parsed
    arguments, the date, and the load average before (``load_before``, from ``os.getloadavg()``) and now, since other
    work on the machine inflates the timings."""
    from jaxforget import __version__

    return {
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min_before": load_before,
        "load_average_1_5_15_min_after": os.getloadavg(),
        "jax_version": jax.__version__,
        "jaxforget_version": __version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "args": {key: str(v) if isinstance(v, pathlib.Path) else v for key, v in vars(args).items()},
    }


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
