"""jaxforget: sharpness-aware parameter selection for machine unlearning, end to end.

jaxforget run trains the paper's CNN on the embedded MNIST subset with a poisoned group (flipped labels by default,
or a backdoor), retrains the clean reference, estimates the curvature, selects the same fraction of parameters by
every rule, unlearns with every update, and prints one table (also written as results.json, results.md and
results.png under --out). Checkpoints and stage records go to --workdir: a rerun resumes after the last finished
stage, and a changed setting reruns only the stages that depend on it. jaxforget train|curvature|select|unlearn|
evaluate run one stage each, on the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

from jaxforget import __version__

_LISTS = ("selections", "updates", "cg_selections")


def _help(name: str) -> str:
    """The comment beside a RunConfig field, as its help text."""
    import inspect

    from jaxforget.settings import RunConfig

    for line in inspect.getsource(RunConfig).splitlines():
        if line.strip().startswith(f"{name}:") and "#" in line:
            return line.split("#", 1)[1].strip()
    return ""


def _value_type(field) -> type:
    """The type a RunConfig field's option parses to: ``float | None`` parses as ``float``."""
    import types
    import typing

    from jaxforget.settings import RunConfig

    hint = typing.get_type_hints(RunConfig)[field.name]
    if isinstance(hint, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def _options() -> argparse.ArgumentParser:
    from jaxforget.settings import SELECTIONS, STAGES, UPDATES, RunConfig

    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (shared by every stage; a changed setting reruns what depends on it)")
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        text = f"{_help(field.name)} (default: %(default)s)"
        if field.name in _LISTS:
            choices = ", ".join(SELECTIONS if "selections" in field.name else UPDATES)
            group.add_argument(flag, default=",".join(default), metavar="A,B,...", help=f"{text}; from: {choices}")
        elif isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=_help(field.name))
        elif field.name == "data_dir":
            group.add_argument(flag, default=None, metavar="DIR", help=_help(field.name))
        elif default is None:
            group.add_argument(flag, type=_value_type(field), default=None, help=_help(field.name))
        else:
            group.add_argument(flag, type=_value_type(field), default=default, help=text)
    group.add_argument(
        "--seeds",
        default=None,
        metavar="S,T,...",
        help="several seeds (each run in WORKDIR/seed-S); the table shows means and 95%% intervals (overrides --seed)",
    )
    files = parent.add_argument_group("files and output")
    files.add_argument("--workdir", default="runs/work", help="checkpoints and stage records (default: %(default)s)")
    files.add_argument(
        "--out", default="runs/latest", help="results.json, results.md and results.png (default: %(default)s)"
    )
    files.add_argument("--quiet", action="store_true", help="print only the final table")

    parser = argparse.ArgumentParser(prog="jaxforget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"jaxforget {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "run", parents=[parent], help="every stage in order, resuming; prints the table", description=__doc__
    )
    stage_help = {
        "train": "train the poisoned model and the retrained reference (orbax checkpoints in --workdir)",
        "curvature": "estimate the Hessian diagonal and the baselines' scores at the poisoned parameters",
        "select": "turn each selection rule into a mask at --budget",
        "unlearn": "apply every update with every mask",
        "evaluate": "score every model and write the results to --out",
    }
    for stage in STAGES:
        commands.add_parser(stage, parents=[parent], help=stage_help[stage])
    return parser


def _config(args: argparse.Namespace, seed: int):
    from jaxforget.settings import RunConfig

    values = {}
    for field in dataclasses.fields(RunConfig):
        value = getattr(args, field.name)
        if field.name in _LISTS:
            value = tuple(item.strip() for item in value.split(",") if item.strip())
        values[field.name] = value
    values["seed"] = seed
    return RunConfig(**values)


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: {args.seeds!r} must be comma-separated integers, e.g. 0,1,2.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {args.seeds!r} must list distinct integers, e.g. 0,1,2.")
    return seeds


def _versions() -> dict[str, str]:
    from importlib import metadata

    names = ("jaxforget", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _report(configs, records, compute, curvature, out: pathlib.Path, seconds: float, argv) -> None:
    from jaxforget import report

    config = configs[0]
    rows = report.aggregate([r["rows"] for r in records], relearn_cap=config.relearn_steps)
    seeds = [c.seed for c in configs]
    title = (
        f"jaxforget: {config.model} on {config.dataset}, {config.scenario} group of {config.group_size}, "
        f"budget {config.budget:g}, seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    )
    import jax

    record = {
        "config": {**dataclasses.asdict(config), "seeds": seeds},
        "seconds": seconds,
        "stage_seconds": compute,
        "curvature": curvature,  # per seed: samples, share of exact zeros, seconds per estimator
        "command": " ".join(["jaxforget", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(),
        },
        "versions": _versions(),
        "per_seed": [r["rows"] for r in records],
    }
    per_seed = [r["rows"] for r in records]
    paired = len(seeds) > 1 and "hessian-largest" in config.selections
    comparisons = report.paired_comparisons(per_seed, relearn_cap=config.relearn_steps) if paired else None
    paths = report.write_results(
        out, record, rows, relearn_cap=config.relearn_steps, title=title, comparisons=comparisons
    )
    print(title)
    print(report.format_table(rows, relearn_cap=config.relearn_steps))
    stage_total = sum(sum(c.values()) for c in compute)
    print(f"\nwrote {', '.join(str(p) for p in paths)} (stages {stage_total:.0f} s; this call {seconds:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _options().parse_args(argv)
    from jaxforget.pipeline import run_stage
    from jaxforget.settings import STAGES, check_config

    start = time.perf_counter()
    try:
        seeds = _seeds(args)
        configs = [_config(args, seed) for seed in seeds]
        for config in configs:
            check_config(config)
        stages = STAGES if args.command == "run" else (args.command,)
        records, compute, curvature = [], [], []
        for config in configs:
            workdir = pathlib.Path(args.workdir) / f"seed-{config.seed}"
            stage_records = {stage: run_stage(stage, config, workdir, quiet=args.quiet) for stage in stages}
            records.append(stage_records[stages[-1]])
            # Seconds the stages took when they ran (a reused stage keeps the time of its first run).
            compute.append({stage: r["stage_seconds"] for stage, r in stage_records.items()})
            if "curvature" in stage_records:
                keep = ("samples", "reference_samples", "zero_share", "seconds", "gradient_seconds")
                curvature.append({k: stage_records["curvature"].get(k) for k in keep})
    except (ValueError, FileNotFoundError, ModuleNotFoundError, ConnectionError) as error:
        print(f"jaxforget: error: {error}", file=sys.stderr)
        return 2
    if args.command in ("run", "evaluate"):
        _report(configs, records, compute, curvature, pathlib.Path(args.out), time.perf_counter() - start, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
