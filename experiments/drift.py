"""How far floating-point drift alone moves the main job's numbers: the bound behind ``--check-reproduction``.

Runs of one command that differ only in the order of floating-point sums are compared value by value with a
reference run. Each variant below changes that order on this machine without changing the code or the data:

    taskset -c 0 jaxforget run --workdir runs/drift/work-1core --out runs/drift/1core          # one core, not two
    XLA_FLAGS=--xla_cpu_enable_fast_math=true jaxforget run --workdir runs/drift/work-fastmath \\
        --out runs/drift/fastmath                                                              # XLA reassociates

    python experiments/drift.py runs/drift/1core runs/drift/fastmath --reference experiments/results/default

writes ``experiments/results/drift/summary.json``: per metric, the largest difference, how many values differ, and
the bound :data:`jaxforget.reproduction.DRIFT` sets (a test checks that the bound covers the measured drift).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jaxforget import reproduction
from jaxforget.atomic import write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path: str) -> dict:
    folder = pathlib.Path(path)
    return json.loads((folder / "results.json" if folder.is_dir() else folder).read_text())


def measure(variants: dict[str, dict], reference: dict) -> dict:
    """Per variant and metric: values compared, how many differ, the largest difference and where it was."""
    summary = {}
    for name, results in variants.items():
        per_metric: dict[str, dict] = {}
        for entry in reproduction.differences(results, reference):
            if entry["metric"] == "row":
                raise ValueError(f"{name}: method {entry['method']} is missing from the reference; same command?")
            metric = per_metric.setdefault(entry["metric"], {"compared": 0, "differ": 0, "max": 0.0, "at": None})
            metric["compared"] += 1
            if entry["difference"] > 0:
                metric["differ"] += 1
            if entry["difference"] > metric["max"]:
                metric["max"], metric["at"] = entry["difference"], entry["method"]
        summary[name] = {
            "machine": results.get("machine"),
            "command": results.get("command"),
            "metrics": per_metric,
            "values_compared": sum(m["compared"] for m in per_metric.values()),
            "values_differ": sum(m["differ"] for m in per_metric.values()),
        }
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="results folders of the variant runs (named by their folder)")
    parser.add_argument("--reference", required=True, help="results folder of the reference run")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "drift"))
    args = parser.parse_args(argv)
    reference = _load(args.reference)
    variants = {pathlib.Path(v).name: _load(v) for v in args.variants}
    for results in variants.values():
        reproduction.check_comparable(reference, _config(results), results["config"]["seeds"])
    measured = measure(variants, reference)
    largest = {}
    for variant in measured.values():
        for metric, entry in variant["metrics"].items():
            largest[metric] = max(largest.get(metric, 0.0), entry["max"])
    record = {
        "reference": {"path": args.reference, "machine": reference.get("machine"), "command": reference["command"]},
        "variants": measured,
        "largest": largest,
        "bound": reproduction.DRIFT,
    }
    path = write_json_atomic(pathlib.Path(args.out) / "summary.json", record)
    for metric in sorted(largest):
        print(f"{metric:<22} largest difference {largest[metric]:.4g}  bound {reproduction.DRIFT[metric]:g}")
    print(f"wrote {path}")
    return 0


def _config(results: dict):
    from jaxforget.settings import RunConfig

    stored = {k: v for k, v in results["config"].items() if k != "seeds"}
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return RunConfig(**stored)


if __name__ == "__main__":
    sys.exit(main())
