"""The benchmark helpers: time_runs times warm runs within its budget; benchmark_metadata records the run."""

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp

from jaxforget import __version__
from jaxforget.timing import benchmark_metadata, time_runs


def test_time_runs_warms_up_then_times_at_most_repeats_within_the_budget():
    fn = jax.jit(lambda x: jnp.sin(x).sum())
    times, warm_up, output = time_runs(fn, (jnp.ones(8),), repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times) and warm_up > 0
    assert float(output) == float(jnp.sin(jnp.ones(8)).sum())
    times, _, _ = time_runs(fn, (jnp.ones(8),), repeats=3, budget_s=0.0)  # the warm-up spent the budget
    assert times == []


def test_benchmark_metadata_records_the_run_as_json():
    args = argparse.Namespace(output=pathlib.Path("/tmp/x.json"), steps=3)
    load = os.getloadavg()
    record = json.loads(json.dumps(benchmark_metadata(args, load)))  # every value serializes
    assert record["args"] == {"output": "/tmp/x.json", "steps": 3}
    assert record["jaxforget_version"] == __version__ and record["jax_version"] == jax.__version__
    assert record["load_average_1_5_15_min_before"] == list(load) and record["cpu_count"] == os.cpu_count()
    assert record["command"].startswith("python ") and record["date"].endswith("+00:00")
