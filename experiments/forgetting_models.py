"""How many models does the forgetting score need? The challenge's score between two families of real models, against K.

The forgetting score (``jaxforget.forgetting``, the NeurIPS 2023 unlearning challenge's) compares, example by example,
the confidences of K unlearned models with those of K retrained ones. Before a method's score means anything, K must
separate the two ends of the scale on this task:

- ``poisoned vs retrained``: models that forgot nothing (trained on D, Z with its flipped labels) against models
  retrained on the corrected data. A measure worth its cost scores this far below 1.
- ``retrained vs retrained``: two disjoint sets of retrained models, i.e. perfect unlearning. It would score 1 with
  infinitely many models; with K models the threshold attacks find spurious separation in the tails.

Both families are trained as ``jaxforget run --forgetting K`` trains its families (``pipeline.train_family``; each
model differs in initialization and batch order) on the main job's label flip (its split and group of seed ``--seed``,
its model, steps and learning rate; options this script does not know are the main job's, e.g. ``--dataset mnist5k
--model cnn``; default: the MLP on digits). The confidence is the logit-scaled confidence of Z's training (flipped)
label. For each K this records both scores with a bootstrap interval over models (re-centred, see
``forgetting.bootstrap_interval``) and the U-LiRA AUC.

    python experiments/forgetting_models.py          # about 4 minutes on 2 CPU cores (MLP on digits)

writes ``experiments/results/forgetting-models/<dataset>-<model>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax

from jaxforget import cli, forgetting, pipeline, settings
from jaxforget.atomic import write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the main job's seed: its split and group Z")
    parser.add_argument("--ks", default="4,8,16,32", help="family sizes; 2 * max(K) retrained models are trained")
    parser.add_argument("--resamples", type=int, default=20, help="bootstrap resamples per score")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "forgetting-models"))
    args, run_options = parser.parse_known_args(argv)  # the others are the main job's, e.g. --train-steps
    ks = sorted({int(k) for k in args.ks.split(",")})
    if ks[0] < 3:
        parser.error("--ks: every family size must be at least 3 (the LiRA attack leaves one model out).")
    defaults = ["--dataset", "digits", "--model", "mlp"]
    config = cli._config(cli._options().parse_args(["run", *defaults, *run_options]), args.seed)
    settings.check_config(config)
    setup = pipeline.setup(config)
    scenario = setup.scenario
    group = scenario.poisoned_group  # Z with its flipped labels
    start = time.perf_counter()
    largest = ks[-1]
    poisoned, _ = pipeline.train_family(setup, config, scenario.train, [1000 + k for k in range(largest)])
    retrained, _ = pipeline.train_family(setup, config, scenario.clean, [2000 + k for k in range(2 * largest)])
    train_seconds = time.perf_counter() - start
    on_poisoned = pipeline.family_confidences(setup, config, poisoned, group)
    on_retrained = pipeline.family_confidences(setup, config, retrained, group)
    key = jax.random.key(args.seed)
    rows = []
    for k in ks:
        pairs = {
            "poisoned vs retrained": (on_poisoned[:k], on_retrained[:k]),
            "retrained vs retrained": (on_retrained[largest : largest + k], on_retrained[:k]),
        }
        for name, (first, second) in pairs.items():
            interval = forgetting.bootstrap_interval(
                forgetting.forgetting_score_from_confidences,
                first,
                second,
                jax.random.fold_in(key, k),
                resamples=args.resamples,
            )
            rows.append(
                {
                    "k": k,
                    "pair": name,
                    "forgetting_score": interval.estimate,
                    "interval": [interval.low, interval.high],
                    "lira_auc": forgetting.lira_attack(first, second).auc,
                }
            )
            print(
                f"K = {k:>3}  {name:<24} score {interval.estimate:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
                f"  LiRA AUC {rows[-1]['lira_auc']:.3f}",
                flush=True,
            )
    record = {
        "command": " ".join(["python", "experiments/forgetting_models.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": dataclasses.asdict(config),
        "group_size": int(len(scenario.group)),
        "models": {"poisoned": largest, "retrained": 2 * largest},
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "resamples": args.resamples,
        "rows": rows,
    }
    path = write_json_atomic(pathlib.Path(args.out) / f"{config.dataset}-{config.model}.json", record)
    print(f"wrote {path} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
