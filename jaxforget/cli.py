"""The ``jaxforget`` command.

``jaxforget run`` currently runs the curvature stage of the method end to end on real data: it trains the paper's CNN
briefly on the embedded MNIST subset, computes the exact Hessian diagonal (the exact GGN diagonal, equal to it for
this ReLU network), and scores every estimator against it by cost and by how many of the truly largest entries it
finds. The unlearning comparison joins it as the later stages land.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

import jaxforget as jf
from jaxforget.atomic import write_json_atomic
from jaxforget.metrics import relative_error, top_k_recall
from jaxforget.timing import time_runs

RECALL_FRACTIONS = (0.001, 0.01, 0.1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxforget", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="train the paper's CNN on embedded MNIST and score every curvature estimator against the exact one",
    )
    run.add_argument("--dataset", default="mnist5k", choices=jf.EMBEDDED_DATASETS, help="embedded data set")
    run.add_argument("--train-steps", type=int, default=300, help="Adam steps of batch 64 before measuring")
    run.add_argument("--batch-size", type=int, default=64, help="examples the curvature is taken on")
    run.add_argument("--probes", type=int, default=32, help="Hutchinson probes")
    run.add_argument("--repeats", type=int, default=3, help="timed runs per estimator (the median is reported)")
    run.add_argument("--seed", type=int, default=0, help="seed for the split, initialization and probes")
    run.add_argument("--out", default="runs/demo", help="folder for results.json")
    run.add_argument("--quiet", action="store_true", help="print only the final table")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("train_steps", "batch_size", "probes", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"jaxforget: --{name.replace('_', '-')} must be at least 1.")


def _median_ms(fn: Callable, *args, repeats: int) -> tuple[float, object]:
    times, _, out = time_runs(fn, args, repeats=repeats)
    return 1e3 * statistics.median(times), out


def _train(model, params, data: jf.Batch, steps: int, seed: int, log) -> object:
    loss_fn = jf.loss_fn_for(model)
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    epochs = -(-steps * 64 // len(data.labels))
    for index, batch in enumerate(jf.batches(data, 64, seed=seed, epochs=epochs)):
        if index == steps:
            break
        params, opt_state, loss = step(params, opt_state, batch)
        if (index + 1) % 100 == 0 or index + 1 == steps:
            log(f"  step {index + 1}/{steps}: loss {float(loss):.3f}")
    return params


def run(args: argparse.Namespace) -> dict:
    """Trains, measures every estimator against the exact diagonal, prints a table and writes results.json."""
    log = (lambda *_: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    data = jf.embedded_dataset(args.dataset)
    train_idx, test_idx = jf.stratified_split(data.labels, 0.2, seed=args.seed)
    train = jf.Batch(data.inputs[train_idx], data.labels[train_idx])
    model = jf.CNN(features=(32, 64) if args.dataset == "mnist5k" else (16, 32))
    key = jax.random.key(args.seed)
    params = jax.jit(lambda k: jf.init_model(model, k, (1, *train.inputs.shape[1:])))(key)["params"]
    num_params = sum(x.size for x in jax.tree.leaves(params))
    log(f"Training the CNN ({num_params:,} parameters) on {len(train_idx)} {args.dataset} images")
    params = _train(model, params, train, args.train_steps, args.seed, log)
    logits_fn, loss_fn = jf.logits_fn_for(model), jf.loss_fn_for(model)
    accuracy = jnp.mean(jnp.argmax(jax.jit(logits_fn)(params, data.inputs[test_idx]), -1) == data.labels[test_idx])
    log(f"Test accuracy {float(accuracy):.3f}; measuring estimators on {args.batch_size} training images")

    batch = jf.Batch(*(jnp.asarray(a[: args.batch_size]) for a in train))
    estimators: dict[str, Callable] = {
        "exact GGN = Hessian diagonal": lambda p, b, k: jf.ggn_diagonal(logits_fn, p, b.inputs),
        f"Hutchinson, {args.probes} probes": lambda p, b, k: jf.hutchinson_diagonal(
            loss_fn, p, b, k, num_probes=args.probes
        ),
        "Monte Carlo GGN, 1 sample": lambda p, b, k: jf.gnb_diagonal(logits_fn, p, b.inputs, k, num_samples=1),
        "Monte Carlo GGN, 8 samples": lambda p, b, k: jf.gnb_diagonal(logits_fn, p, b.inputs, k, num_samples=8),
        "empirical Fisher": lambda p, b, k: jf.fisher_diagonal(loss_fn, p, b),
        "|gradient| (SalUn)": lambda p, b, k: jf.gradient_saliency(loss_fn, p, b),
    }
    probe_key = jax.random.key(args.seed + 1)
    gradient_ms, _ = _median_ms(jax.jit(jax.grad(loss_fn)), params, batch, repeats=args.repeats)
    rows, exact = [], None
    for name, estimator in estimators.items():
        log(f"  {name}")
        ms, estimate = _median_ms(jax.jit(estimator), params, batch, probe_key, repeats=args.repeats)
        exact = estimate if exact is None else exact
        row = {"estimator": name, "ms": ms, "gradients": ms / gradient_ms}
        row |= {f"recall@{f:.1%}": float(top_k_recall(estimate, exact, f)) for f in RECALL_FRACTIONS}
        row["relative_error"] = float(relative_error(estimate, exact))
        rows.append(row)
    record = {
        "command": "jaxforget " + " ".join(sys.argv[1:]),
        "dataset": args.dataset,
        "num_params": num_params,
        "test_accuracy": float(accuracy),
        "batch_size": args.batch_size,
        "gradient_ms": gradient_ms,
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "rows": rows,
    }
    path = write_json_atomic(f"{args.out}/results.json", record)
    _print_table(rows, gradient_ms)
    log(f"Wrote {path}")
    return record


def _print_table(rows: Sequence[dict], gradient_ms: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Hessian-diagonal estimators vs the exact diagonal (1 gradient = {gradient_ms:.0f} ms)")
    for column in ("estimator", "ms", "gradients", *(f"top {f:.1%} recall" for f in RECALL_FRACTIONS), "rel. error"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for row in rows:
        recalls = [f"{row[f'recall@{f:.1%}']:.2f}" for f in RECALL_FRACTIONS]
        table.add_row(
            row["estimator"], f"{row['ms']:.0f}", f"{row['gradients']:.1f}", *recalls, f"{row['relative_error']:.2f}"
        )
    Console(width=160).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
