"""The paper's setting at full scale: MNIST with the paper's CNN, CIFAR-10 with ResNet-18, label flip and backdoor.

Each configuration below is the main job (``jaxforget run``) with the data set, model, training recipe and group
sizes of the paper's scale, run for every scenario over five seeds, every selection rule and every update. So the
checkpoints (orbax), the resume after an interruption, the reports and the paired tests are the main job's::

    python experiments/paper_mnist_cnn.py --data-dir ~/tensorflow_datasets
    python experiments/paper_cifar10_resnet18.py --data-dir ~/tensorflow_datasets --precision bfloat16

writes ``<out>/<scenario>/results.{json,md,png}`` and keeps the stages under ``<workdir>/<scenario>/seed-S``; a
rerun resumes after the last finished stage. The data must be prepared in tfds' layout under ``--data-dir`` (or
pass ``--download``, which needs TensorFlow and the network). Options this script does not know are passed to
``jaxforget run`` and override the configuration (``--train-steps 200 --width 16`` for a quick look).
``--plan`` prints the runs and the expected time on one GPU without running anything.

Choices (the paper's body is not available; see PAPER.md):
- Group sizes. Label flip: 10,000 flipped labels on CIFAR-10, as in Warnecke et al.'s public run, and 6,000 (10%) on
  MNIST. Backdoor: 5% of the training set carries the trigger (relabelled to class 0); Z~ is the triggered images
  with their true labels (the correction that measured removal, PAPER.md).
- Training. The CNN: Adam 1e-3, batch 128, about 5 epochs (2,000 steps). ResNet-18: SGD with Nesterov momentum
  0.9, rate 0.1 warmed up over 2% of the steps and decayed on a cosine, weight decay 5e-4, random crops and flips,
  batch 128, 40 epochs of the 40,000 training images (12,500 steps); this recipe usually reaches 93-94% on CIFAR-10.
  Neither accuracy has been measured here (no GPU): the results files record the accuracies reached.
- The unlearning hyperparameters are the tuned ones (``jaxforget/tuned.json``, tuned on the 5,000-digit MNIST subset
  and the CNN); they are not re-tuned at this scale.
- The expected time is an estimate from XLA's FLOP count of one training step (``cost_analysis``) at an assumed
  sustained throughput; it is not a measurement.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from jaxforget import settings

SEEDS = "0,1,2,3,4"
SCENARIOS = ("label-flip", "backdoor")
# Every selection rule and update; CG (a linear solve per method) on the Hessian rule and on all parameters.
_METHODS = {
    "--selections": ",".join(settings.SELECTIONS),
    "--updates": ",".join(settings.UPDATES),
    "--cg-selections": "hessian-largest,all",
}
CONFIGS = {
    "mnist-cnn": {
        "train_size": 60_000,
        "options": {
            "--dataset": "mnist",
            "--model": "cnn",
            "--batch-size": "128",
            "--train-steps": "2000",
            "--learning-rate": "1e-3",
            "--validation-size": "5000",
            "--holdout-size": "5000",
        },
        "group": {"label-flip": 6000, "backdoor": 2500},
    },
    "cifar10-resnet18": {
        "train_size": 50_000,
        "options": {
            "--dataset": "cifar10",
            "--model": "resnet18",
            "--width": "64",
            "--optimizer": "sgd",
            "--learning-rate": "0.1",
            "--weight-decay": "5e-4",
            "--augment": "crop-flip",
            "--batch-size": "128",
            "--train-steps": "12500",
            "--validation-size": "5000",
            "--holdout-size": "5000",
        },
        "group": {"label-flip": 10_000, "backdoor": 2000},
    },
}
# Sustained throughput assumed for the estimate: about a tenth of an H200's dense TF32 peak, what a batch-128
# ResNet-18 step typically sustains. An assumption, not a measurement.
ASSUMED_FLOPS_PER_SECOND = 50e12
# Gradient-equivalents per training sample of the curvature stage on a GPU: the exact GGN (one backward pass per
# class: 10), Hutchinson with 2 probes (1 + 1.26 per probe, measured on an H200), the Monte Carlo GGN (1), the
# empirical Fisher (per-example gradients, about 2).
_CURVATURE_PASSES = 10 + 1 + 2 * 1.26 + 1 + 2


def scenario_options(name: str, scenario: str) -> dict[str, str]:
    """The ``jaxforget run`` options of configuration ``name`` for ``scenario``, before any user override."""
    options = {**CONFIGS[name]["options"], **_METHODS, "--group-size": str(CONFIGS[name]["group"][scenario])}
    if scenario == "backdoor":
        options.update({"--scenario": "backdoor", "--correction": "relabel"})
    return options


def command_line(options: dict[str, str], extra: list[str], args: argparse.Namespace, scenario: str) -> list[str]:
    """``jaxforget run``'s argument list: the configuration, then the user's overrides (argparse keeps the last)."""
    argv = ["run"]
    for flag, value in options.items():
        argv += [flag, value]
    argv += ["--seeds", args.seeds, "--devices", str(args.devices)]
    argv += ["--workdir", f"{args.workdir}/{scenario}", "--out", f"{args.out}/{scenario}"]
    if args.data_dir is not None:
        argv += ["--data-dir", args.data_dir]
    return argv + extra


def _value(argv: list[str], flag: str) -> str:
    """The last value ``argv`` gives ``flag`` (the one argparse keeps)."""
    return [argv[i + 1] for i, item in enumerate(argv[:-1]) if item == flag][-1]


def step_flops(argv: list[str]) -> float:
    """XLA's FLOP count of one training step of the model ``argv`` trains, at its batch size (lowered, not run)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxforget import models, train

    model_name, batch = _value(argv, "--model"), int(_value(argv, "--batch-size"))
    if model_name == "resnet18":
        model, shape = models.ResNet18(num_classes=10, width=int(_value(argv, "--width"))), (32, 32, 3)
    else:
        model, shape = models.CNN(num_classes=10), (28, 28, 1)
    state = jax.eval_shape(
        lambda key: train.create_train_state(model, key, (1, *shape), optax.sgd(0.1, momentum=0.9)),
        jax.random.key(0),
    )
    inputs = models.Batch(jax.ShapeDtypeStruct((batch, *shape), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    return float(jax.jit(train.train_step).lower(state, inputs).cost_analysis()["flops"])


def expected_gpu_seconds(argv: list[str], train_size: int) -> dict[str, float]:
    """A coarse estimate of one seed's stages on one GPU, from the FLOPs of a training step (see the module notes)."""
    steps, batch = int(_value(argv, "--train-steps")), int(_value(argv, "--batch-size"))
    kept = train_size - int(_value(argv, "--validation-size")) - int(_value(argv, "--holdout-size"))
    per_step = step_flops(argv) / ASSUMED_FLOPS_PER_SECOND
    methods = len(_value(argv, "--selections").split(",")) * len(_value(argv, "--updates").split(","))
    return {
        "train": 2 * steps * per_step,  # the poisoned model and the retrained reference
        "curvature": _CURVATURE_PASSES * kept / batch * per_step,
        # every method's update, a relearning test of 20 steps and its scoring: about 200 training steps each
        "unlearn_and_evaluate": methods * 200 * per_step,
    }


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{math.ceil(seconds / 60)} min"


def main(name: str, argv: list[str] | None = None) -> int:
    from jaxforget import cli

    parser = argparse.ArgumentParser(
        prog=f"paper_{name.replace('-', '_')}.py",
        description=f"The paper's {name} setting, every scenario over five seeds (see experiments/paper.py).",
        epilog="Other options are passed to `jaxforget run` and override the configuration.",
    )
    parser.add_argument("--data-dir", default=None, help="tfds data directory holding the prepared data set")
    parser.add_argument("--seeds", default=SEEDS, help="seeds, comma-separated (default: %(default)s)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="scenarios (default: %(default)s)")
    parser.add_argument("--devices", type=int, default=0, help="devices to use (0: all; default: %(default)s)")
    parser.add_argument("--workdir", default=f"runs/paper-{name}", help="stages and checkpoints (default: %(default)s)")
    parser.add_argument(
        "--out", default=f"experiments/results/paper-{name}", help="results folders (default: %(default)s)"
    )
    parser.add_argument("--plan", action="store_true", help="print the runs and the expected time; run nothing")
    args, extra = parser.parse_known_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        parser.error(f"--scenarios: {','.join(unknown) or 'nothing'} chosen; choose from {', '.join(SCENARIOS)}.")
    seeds = [s for s in args.seeds.split(",") if s.strip()]
    runs = [command_line(scenario_options(name, scenario), extra, args, scenario) for scenario in chosen]
    estimate = expected_gpu_seconds(runs[0], CONFIGS[name]["train_size"])
    total = sum(estimate.values()) * len(seeds) * len(runs)
    print(
        f"{name}: {len(runs)} scenario(s) x {len(seeds)} seed(s); expected on one GPU: about {_duration(total)} "
        f"(per seed: train {_duration(estimate['train'])}, curvature {_duration(estimate['curvature'])}, "
        f"unlearn and evaluate {_duration(estimate['unlearn_and_evaluate'])}; estimated from XLA's FLOP count at "
        f"{ASSUMED_FLOPS_PER_SECOND / 1e12:.0f} TFLOP/s sustained; compute only, not measured)",
        flush=True,
    )
    for argv_run in runs:
        print("jaxforget " + " ".join(argv_run), flush=True)
    if args.plan:
        return 0
    for argv_run in runs:
        start = time.perf_counter()
        status = cli.main(argv_run)
        if status != 0:
            return status
        print(f"{name}: finished in {_duration(time.perf_counter() - start)}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CONFIGS:
        sys.exit(f"usage: python experiments/paper.py {{{','.join(CONFIGS)}}} [options]; or run paper_<config>.py")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
