"""Which estimator of diag(H) should the canary's Hessian rule use? Measured on the default language model itself.

``benchmarks/curvature_transformer.py`` scores the estimators against the exact Hessian diagonal of a tiny
Transformer, where the answer depends on how well the model fits (the exact GGN selects best after training to a
loss of 0.03, Hutchinson at large budgets at initialization). The canary's model sits between the two (training loss
about 1.2 nats per character), so this measures at full size: the poisoned model of ``jaxforget run --scenario
canary`` (its defaults, seed ``--seed``), every training window, batches of 64 as in the curvature stage.

The exact diagonal is out of reach here (one Hessian-vector product per parameter and window), so the reference is
Hutchinson's estimate with ``--reference-probes`` Rademacher probes per batch, drawn as two independent halves:
unbiased for diag(H). Its own noise is reported as the top-1% recall of one half against the other (the whole
reference, with twice the probes, is more reliable than that). Each candidate is scored by its top-k recall of the
reference's largest entries at k = 0.1%, 1% (the default budget) and 10%, its relative error, and its seconds over
the stream (compilation excluded):

- ``hutchinson-P``: Hutchinson with P probes per batch;
- ``gnb-S``: the Monte Carlo GGN (``gnb_diagonal``) with S sampled label sequences per window;
- ``residual-S-P``: ``gnb-S`` plus Hutchinson on H - G with P probes (``hutchinson_residual_diagonal``);
- ``fisher``: the empirical Fisher diagonal.

    python benchmarks/canary_curvature.py     # about 8 minutes on 2 CPU cores; writes results/canary-curvature-cpu.json
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import shlex
import sys
import tempfile

import jax
import numpy as np

import jaxforget as jf
from jaxforget import curvature, models, pipeline, settings
from jaxforget.atomic import write_json_atomic

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
FRACTIONS = {"recall@0.1%": 0.001, "recall@1%": 0.01, "recall@10%": 0.1}
BATCH = pipeline._CURVATURE_BATCH  # windows per batch, as in the curvature stage


def _candidates(model, params, probes: int, samples: int) -> dict:
    """Jitted ``estimator(batch, key) -> diagonal`` per candidate name."""
    loss_fn, logits_fn = models.loss_fn_for(model, None), models.logits_fn_for(model, None)

    def hutchinson(count):
        return lambda batch, key: curvature.hutchinson_diagonal(loss_fn, params, batch, key, num_probes=count)

    def gnb(count):
        return lambda batch, key: curvature.gnb_diagonal(logits_fn, params, batch.inputs, key, num_samples=count)

    def residual(count, probe_count):
        def estimate(batch, key):
            first, second = jax.random.split(key)
            ggn = curvature.gnb_diagonal(logits_fn, params, batch.inputs, first, num_samples=count)
            return curvature.hutchinson_residual_diagonal(
                loss_fn, logits_fn, params, batch, second, num_probes=probe_count, ggn=ggn
            )

        return estimate

    named = {
        f"hutchinson-{probes}": hutchinson(probes),
        f"hutchinson-{4 * probes}": hutchinson(4 * probes),
        "gnb-1": gnb(1),
        f"gnb-{samples}": gnb(samples),
        f"residual-{samples // 2}-{probes}": residual(samples // 2, probes),
        "fisher": lambda batch, key: curvature.fisher_diagonal(loss_fn, params, batch),
    }
    return {name: jax.jit(fn) for name, fn in named.items()}


def _stream(fn, batches, key) -> tuple[np.ndarray, float]:
    """The curvature stage's streaming (every shape compiled first, then the example-weighted mean of ``fn`` over
    ``batches``, timed), raveled."""
    diagonal, seconds = pipeline._stream(lambda params, stats, batch, k: fn(batch, k), None, None, batches, key)
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(diagonal)]), seconds


def _scores(estimate: np.ndarray, reference: np.ndarray, noise: float | None = None) -> dict:
    """Recalls of the reference's top entries and the relative error; with ``noise`` (the reference's expected
    squared error, ||A - B||^2 / 4 for the mean of two independent halves A, B) also the error against diag(H) itself:
    for an estimate independent of the reference, E||e - r||^2 = ||e - h||^2 + E||r - h||^2, so subtracting the noise
    leaves an unbiased estimate of ||e - h||^2 (and ||r||^2 - noise of ||h||^2)."""
    scores = {name: float(jf.metrics.top_k_recall(estimate, reference, f)) for name, f in FRACTIONS.items()}
    scores["relative_error"] = float(jf.metrics.relative_error(estimate, reference))
    if noise is not None:
        squared = float(np.sum((estimate.astype(np.float64) - reference) ** 2)) - noise
        scores["error_against_diag_h"] = float(np.sqrt(max(squared, 0.0) / (float(np.sum(reference**2)) - noise)))
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-probes", type=int, default=32, help="probes per batch, split into two halves")
    parser.add_argument("--probes", type=int, default=2, help="the Hutchinson rule's probes per batch")
    parser.add_argument("--samples", type=int, default=8, help="label sequences per window of the larger gnb")
    parser.add_argument("--windows", type=int, default=0, help="training windows used (0: all; smaller to smoke-test)")
    parser.add_argument("--workdir", default=None, help="where the poisoned model is trained (default: a temporary)")
    parser.add_argument("--out", default=None, help="the JSON file (default: results/canary-curvature-<device>.json)")
    parser.add_argument("train_options", nargs=argparse.REMAINDER, help="after --: options of `jaxforget run`")
    args = parser.parse_args(argv)
    if args.reference_probes < 2 or args.reference_probes % 2:
        parser.error("--reference-probes: must be an even number >= 2 (two independent halves).")
    from jaxforget import cli

    options = [o for o in args.train_options if o != "--"]
    config = cli._config(cli._options().parse_args(["run", "--scenario", "canary", *options]), args.seed)
    settings.check_config(config)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = pathlib.Path(args.workdir or scratch)
        pipeline.run_stage("train", config, workdir, quiet=True)
        state = pipeline.restore_model(workdir, "poisoned", config)
    setup = pipeline.setup(config)
    training = setup.scenario.train
    if args.windows:
        training = jf.Batch(training.inputs[: args.windows], training.labels[: args.windows])
    batches = pipeline._chunks(training, BATCH)
    key = jax.random.key(args.seed)
    loss_fn = models.loss_fn_for(setup.model, None)
    half = jax.jit(
        lambda batch, k: curvature.hutchinson_diagonal(
            loss_fn, state.params, batch, k, num_probes=args.reference_probes // 2
        )
    )
    first, first_seconds = _stream(half, batches, jax.random.fold_in(key, 1))
    second, second_seconds = _stream(half, batches, jax.random.fold_in(key, 2))
    first, second = first.astype(np.float64), second.astype(np.float64)
    reference = (first + second) / 2
    noise = float(np.sum((first - second) ** 2)) / 4
    rows = {}
    for name, fn in _candidates(setup.model, state.params, args.probes, args.samples).items():
        estimate, seconds = _stream(fn, batches, jax.random.fold_in(key, 3))
        rows[name] = {"seconds": seconds, **_scores(estimate, reference, noise)}
        print(
            f"{name:<16} {seconds:7.1f} s  "
            + "  ".join(f"{k} {v:.3f}" for k, v in rows[name].items() if k != "seconds")
        )
    best = max(rows, key=lambda name: rows[name]["recall@1%"])
    closest = min(rows, key=lambda name: rows[name]["error_against_diag_h"])
    record = {
        "command": shlex.join(["python", "benchmarks/canary_curvature.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"seed": args.seed, "train": {k: getattr(config, k) for k in settings.STAGE_FIELDS["train"]}},
        "parameters": int(reference.size),
        "windows": int(len(training.labels)),
        "batch": BATCH,
        "reference": {
            "probes_per_batch": args.reference_probes,
            "seconds": first_seconds + second_seconds,
            "half_against_half": _scores(first, second),
            "relative_noise": float(np.sqrt(noise / (float(np.sum(reference**2)) - noise))),
        },
        "candidates": rows,
        "best_recall@1%": best,
        "lowest_error_against_diag_h": closest,
        "device": str(jax.devices()[0]),
        "versions": {"jax": jax.__version__, "python": platform.python_version(), "jaxforget": jf.__version__},
    }
    out = pathlib.Path(args.out or RESULTS_DIR / f"canary-curvature-{jax.default_backend()}.json")
    write_json_atomic(out, record)
    print(f"reference half against half: {record['reference']['half_against_half']}")
    print(f"best top-1% recall: {best}; lowest error against diag(H): {closest}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
