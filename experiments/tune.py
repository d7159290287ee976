"""Chooses the main job's unlearning hyperparameters on validation data and tuning seeds, and records every score.

For each tuning seed (disjoint from the seeds the README reports) this trains the poisoned and the retrained model,
takes the whole-data curvature and the masks (the main job's own stages), then scores every grid value:

- first-order τ, per selection rule;
- diagonal-Newton damping, per selection rule;
- fine-tuning learning rate and steps per fine-tuning variant (and the ascent weight for finetune-ascent), shared
  by every selection rule (Adam's per-coordinate scaling makes the step size independent of the mask), scored on the
  rules in ``--finetune-selections``;
- CG damping (with ``--with-cg``), on hessian-largest.

The objective is the unlearning target measured away from the test split: the accuracy on Z~ of the tuning seed's
own group for label flips, and one minus the attack success on the validation images poisoned like Z for backdoors.
For the canary it is the fraction of the secret's exposure removed, 1 - exposure / log2 |R|, of the tuning seed's
own secret (each seed draws its secret and its positions; the reported seeds' secrets are never scored here), with
the next-character accuracy on the validation text as utility. The constraint is utility: the mean validation
accuracy over the tuning seeds may fall at most ``--tolerance`` below the poisoned model's. Among the values that
satisfy it the one with the best mean objective is chosen (ties: the higher validation accuracy); where none does,
the most conservative value (the smallest step) is chosen and flagged. The test split is never read.

Writes ``--out/<scenario>.json`` (grid, every score per seed, chosen values) and merges the chosen values into
``jaxforget/tuned.json``, where :class:`jaxforget.settings.RunConfig` takes its defaults from.

    python experiments/tune.py --scenario label-flip --seeds 100,101          # about 12 minutes on 2 CPU cores
    python experiments/tune.py --scenario backdoor --correction relabel --seeds 100

Options it does not know are the main job's (``jaxforget run --help``), e.g. ``--dataset digits --train-steps 30``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxforget import cli, metrics, models, pipeline, settings
from jaxforget.atomic import write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]
_FINETUNE = {"finetune_lr": [3e-4, 1e-3, 3e-3], "finetune_steps": [15, 40]}
GRIDS = {
    "label-flip": {
        "first-order": {"tau": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
        "diagonal-newton": {"damping": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]},
        "finetune": _FINETUNE,
        "finetune-corrected": _FINETUNE,
        "finetune-ascent": {**_FINETUNE, "ascent_weight": [0.1, 1.0]},
        "cg": {"cg_damping": [1e-2, 1e-1, 1.0]},
    },
}
# The backdoor's trade-off is sharper (measured on the tuning seeds with the label-flip grid: every one-step update
# that touched the attack cost 5-40 points of validation accuracy, and fine-tuning had not recovered its utility
# after 40 steps): finer and smaller steps, heavier damping, longer fine-tuning.
_FINETUNE_LONG = {"finetune_lr": [3e-4, 1e-3, 3e-3], "finetune_steps": [40, 100]}
GRIDS["backdoor"] = {
    "first-order": {"tau": [3e-6, 1e-5, 1.5e-5, 2e-5, 3e-5, 1e-4]},
    "diagonal-newton": {"damping": [0.3, 1.0, 3.0, 10.0, 30.0, 100.0]},
    "finetune": _FINETUNE_LONG,
    "finetune-corrected": _FINETUNE_LONG,
    "finetune-ascent": {**_FINETUNE_LONG, "ascent_weight": [0.1, 1.0]},
    "cg": {"cg_damping": [1e-1, 1.0, 10.0]},
}
# The canary's group is a handful of windows whose loss differs from Z~'s in the secret's few characters only, so a
# one-step update on it is tiny at the image scenarios' step sizes (the first run: exposure moved < 0.1 bit at
# tau = 3e-4): larger steps, and the fine-tuning of the image scenarios. The first tuning run picked values at both
# ends (tau 3.0, damping 1e-4), so both grids reach one decade further.
GRIDS["canary"] = {
    "first-order": {"tau": [1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]},
    "diagonal-newton": {"damping": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]},
    "finetune": _FINETUNE,
    "finetune-corrected": _FINETUNE,
    "finetune-ascent": {**_FINETUNE, "ascent_weight": [0.1, 1.0]},
    "cg": {"cg_damping": [1e-2, 1e-1, 1.0]},
}
# Order of conservativeness: the first grid value is the smallest step (large damping counts as small).
CONSERVATIVE_FIRST = {
    "tau": 1,
    "damping": -1,
    "finetune_lr": 1,
    "finetune_steps": 1,
    "ascent_weight": 1,
    "cg_damping": -1,
}


def _grid_points(scenario: str, update: str) -> list[dict]:
    grid = GRIDS[scenario][update]
    points = [{}]
    for name, values in grid.items():
        ordered = sorted(values, reverse=CONSERVATIVE_FIRST[name] < 0)
        points = [{**point, name: value} for point in points for value in ordered]
    return points


class _Scorer:
    """Validation accuracy and the scenario's objective for one tuning seed's models."""

    def __init__(self, setup: pipeline.Setup, config: settings.RunConfig, stats):
        self.setup, self.config, self.stats = setup, config, stats
        self.secret = pipeline.canary_scores(setup, config) if config.scenario == "canary" else None
        predict = jax.jit(
            lambda params, stats, inputs: jnp.argmax(models.logits_fn_for(setup.model, stats)(params, inputs), -1)
        )
        self.predict = lambda params, batch: np.asarray(predict(params, self.stats, batch.inputs))

    def __call__(self, params) -> dict:
        setup = self.setup
        scores = {
            "validation_accuracy": metrics.accuracy(self.predict(params, setup.validation), setup.validation.labels)
        }
        if self.config.scenario == "backdoor":
            attack = metrics.accuracy(self.predict(params, setup.validation_twin), setup.validation_twin.labels)
            scores.update(validation_attack_success=attack, objective=1.0 - attack)
        elif self.secret is not None:
            secret = self.secret(params)
            scores.update(exposure=secret["exposure"], objective=1.0 - secret["exposure"] / secret["log2_space"])
        else:
            corrected = setup.scenario.corrected
            scores.update(group_accuracy=metrics.accuracy(self.predict(params, corrected), corrected.labels))
            scores["objective"] = scores["group_accuracy"]
        return scores


def _tune_seed(config: settings.RunConfig, workdir: pathlib.Path, updates, finetune_selections, log) -> dict:
    for stage in ("train", "curvature", "select"):
        pipeline.run_stage(stage, config, workdir, quiet=True)
    setup = pipeline.setup(config)
    state = pipeline.restore_model(workdir, "poisoned", config)
    params, stats = state.params, state.batch_stats
    masks = pipeline.stage_arrays("select", config, workdir)
    hessian = pipeline.stage_arrays("curvature", config, workdir)["hessian"]
    score = _Scorer(setup, config, stats)
    apply = pipeline.Updates(setup, config, state, hessian)
    results = {"poisoned": score(params), "updates": {}}
    for update in updates:
        rules = config.selections
        if update in settings.FINETUNE_UPDATES:  # the scored rules that this run selects, else all of them
            rules = [rule for rule in finetune_selections if rule in config.selections] or config.selections
        if update == "cg":
            rules = ("hessian-largest",)
        per_rule = {}
        for rule in rules:
            mask, entries = masks[rule], []
            for point in _grid_points(config.scenario, update):
                new_params, info = apply.runner(update, mask, point)[0]()
                if update == "cg":
                    point = {**point, "converged": bool(info["converged"]), "residual": float(info["residual"])}
                finite = pipeline.all_finite(new_params)
                scores = score(new_params) if finite else {"validation_accuracy": 0.0, "objective": 0.0}
                entries.append({**point, **scores, "finite": finite})
            per_rule[rule] = entries
            best = max(e["objective"] for e in entries)
            log(f"  seed {config.seed} {update:<18} {rule:<28} best objective {best:.3f}")
        results["updates"][update] = per_rule
    return results


def _summaries(per_seed: list[dict], scenario: str, update: str, rules, tolerance: float) -> list[dict]:
    """Per grid value: the mean objective over ``rules`` and tuning seeds, the lowest of the rules' mean validation
    accuracies, and whether every rule keeps its mean validation accuracy within ``tolerance`` of the poisoned
    model's."""
    floor = float(np.mean([seed["poisoned"]["validation_accuracy"] for seed in per_seed])) - tolerance
    summaries = []
    for index, point in enumerate(_grid_points(scenario, update)):
        accuracy = {
            rule: float(np.mean([seed["updates"][update][rule][index]["validation_accuracy"] for seed in per_seed]))
            for rule in rules
        }
        objective = [seed["updates"][update][rule][index]["objective"] for seed in per_seed for rule in rules]
        summaries.append(
            {
                **point,
                "objective": float(np.mean(objective)),
                "validation_accuracy": min(accuracy.values()),
                "admissible": all(value >= floor for value in accuracy.values()),
                "floor": floor,
            }
        )
    return summaries


def _pick(summaries: list[dict]) -> dict:
    """The admissible value with the best objective (ties: higher validation accuracy); else the most conservative
    value, flagged as not admissible."""
    admissible = [s for s in summaries if s["admissible"]]
    if not admissible:
        return summaries[0]
    return max(admissible, key=lambda s: (round(s["objective"], 9), s["validation_accuracy"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="label-flip", choices=settings.SCENARIOS)
    parser.add_argument("--correction", default="relabel", choices=settings.CORRECTIONS)
    parser.add_argument("--seeds", default="100,101", help="tuning seeds, disjoint from the reported ones (0-99)")
    parser.add_argument("--updates", default="first-order,diagonal-newton,finetune,finetune-corrected,finetune-ascent")
    parser.add_argument("--with-cg", action="store_true", help="also tune the CG damping (costly on a CPU)")
    parser.add_argument("--finetune-selections", default="hessian-largest,all")
    parser.add_argument("--tolerance", type=float, default=0.01, help="validation accuracy the tuning may give up")
    parser.add_argument("--workdir", default="runs/tune")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "tuning"))
    parser.add_argument("--no-install", action="store_true", help="do not merge the chosen values into tuned.json")
    args, run_options = parser.parse_known_args(argv)  # other options are the main job's, e.g. --train-steps
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(seed < 100 for seed in seeds):
        parser.error("--seeds: tuning seeds must be 100 or above, disjoint from the reported seeds 0-99.")
    updates = [u for u in args.updates.split(",") if u] + (["cg"] if args.with_cg else [])
    finetune_selections = tuple(args.finetune_selections.split(","))
    run_args = ["run", "--scenario", args.scenario, "--correction", args.correction, *run_options]
    config0 = cli._config(cli._options().parse_args(run_args), seeds[0])
    settings.check_config(config0)
    name = settings.scenario_name(config0)
    start = time.perf_counter()
    per_seed = []
    for seed in seeds:
        config = dataclasses.replace(config0, seed=seed)
        workdir = pathlib.Path(args.workdir) / name.replace("/", "-") / f"seed-{seed}"
        print(f"tuning {name} on seed {seed} ({workdir})", flush=True)
        per_seed.append(_tune_seed(config, workdir, updates, finetune_selections, print))
    chosen, grids = {}, GRIDS[args.scenario]
    for update in updates:
        rules = list(per_seed[0]["updates"][update])
        if update in ("first-order", "diagonal-newton"):  # per selection rule
            parameter = next(iter(grids[update]))
            picks = {rule: _pick(_summaries(per_seed, args.scenario, update, [rule], args.tolerance)) for rule in rules}
            chosen[update] = {parameter: {rule: pick[parameter] for rule, pick in picks.items()}}
            chosen[update]["admissible"] = {rule: pick["admissible"] for rule, pick in picks.items()}
        else:  # one value shared by every selection rule
            pick = _pick(_summaries(per_seed, args.scenario, update, rules, args.tolerance))
            chosen[update] = {**{k: pick[k] for k in grids[update]}, "admissible": pick["admissible"]}
    record = {
        "scenario": name,
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "seeds": seeds,
        "objective": {
            "backdoor": "1 - validation attack success",
            "canary": "1 - exposure / log2 |R| of the tuning seed's secret",
        }.get(args.scenario, "accuracy on Z~"),
        "constraint": f"mean validation accuracy >= poisoned model's - {args.tolerance}",
        "grids": {update: grids[update] for update in updates},
        "config": dataclasses.asdict(config0),
        "per_seed": per_seed,
        "chosen": chosen,
        "seconds": time.perf_counter() - start,
        "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_json_atomic(out / f"{name.replace('/', '-')}.json", record)
    print(f"wrote {path} ({record['seconds']:.0f} s)")
    if not args.no_install:
        install(record)
    return 0


def install(record: dict) -> pathlib.Path:
    """Merges ``record``'s chosen values into ``jaxforget/tuned.json`` under its scenario."""
    path = ROOT / "jaxforget" / "tuned.json"
    tuned = json.loads(path.read_text()) if path.exists() else {"scenarios": {}, "sources": {}}
    values = {
        update: {k: v for k, v in chosen.items() if k != "admissible"} for update, chosen in record["chosen"].items()
    }
    tuned["scenarios"].setdefault(record["scenario"], {}).update(values)
    tuned["sources"][record["scenario"]] = f"experiments/results/tuning/{record['scenario'].replace('/', '-')}.json"
    write_json_atomic(path, tuned)
    print(f"updated {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
