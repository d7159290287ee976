"""How fast the canary's language model memorizes the secret: exposure and greedy extraction against training steps.

Trains the poisoned model of ``jaxforget run --scenario canary`` (same data, model, seed and batch order) and
scores the secret every ``--every`` steps, to choose the training length at which unlearning has something to remove:

    python experiments/canary_memorization.py --steps 3000 --every 500 --repetitions 8

writes ``experiments/results/canary-memorization/repetitions-<n>-characters-<n>-lr-<rate>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import optax

from jaxforget import data, pipeline, settings, text, train
from jaxforget.atomic import write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(config: settings.RunConfig) -> str:
    characters = config.text_characters or "all"
    return f"repetitions-{config.repetitions}-characters-{characters}-lr-{config.learning_rate:g}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--repetitions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    for name, kind in (("text_characters", int), ("context", int), ("batch_size", int), ("learning_rate", float)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help="as in `jaxforget run`, and its default")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "canary-memorization"))
    args = parser.parse_args(argv)
    chosen = {name: getattr(args, name) for name in ("text_characters", "context", "batch_size", "learning_rate")}
    config = settings.RunConfig(
        scenario="canary",
        repetitions=args.repetitions,
        seed=args.seed,
        **{name: value for name, value in chosen.items() if value is not None},
    )
    settings.check_config(config)
    setup = pipeline.setup(config)
    tx = optax.adam(config.learning_rate)
    state = train.create_train_state(setup.model, jax.random.key(config.seed), setup.input_shape, tx)
    step, evaluate_step = jax.jit(train.train_step), jax.jit(train.eval_step)
    score = pipeline.canary_scores(setup, config)
    epochs = -(-args.steps // (len(setup.scenario.train.labels) // config.batch_size))
    stream = data.batches(setup.scenario.train, config.batch_size, seed=config.seed, epochs=epochs)
    points, start = [], time.perf_counter()
    for index, batch in enumerate(stream, 1):
        state, _ = step(state, batch)
        if index % args.every == 0 or index == args.steps:
            secret = score(state.params)
            validation = train.evaluate(state, setup.validation, evaluate_step)
            points.append(
                {
                    "step": index,
                    "seconds": time.perf_counter() - start,
                    "exposure": secret["exposure"],
                    "log2_space": secret["log2_space"],
                    "digits_extracted": secret["digits_extracted"],
                    "validation_bits_per_char": text.bits_per_character(validation["loss"]),
                }
            )
            print(json.dumps(points[-1]), flush=True)
        if index == args.steps:
            break
    record = {
        "command": " ".join(["experiments/canary_memorization.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": dataclasses.asdict(config),
        "secret_digits": len(setup.canary.secret),
        "points": points,
    }
    path = write_json_atomic(pathlib.Path(args.out) / _name(config), record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
