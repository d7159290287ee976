"""Benchmark of the Hessian-diagonal estimators on a tiny causal Transformer at equal cost, against its exact Hessian.

The problem is the one of tests/test_curvature_sequences.py, written out here: a one-block pre-LayerNorm Transformer
(causal attention, GELU MLP; 241 parameters) on B = 6 sequences of T = 4 tokens from a vocabulary of V = 5, labels
the next-token rule ``token + 1 mod V`` with a fifth of them random, the loss the softmax cross-entropy averaged over
all B * T tokens. Everything runs in float64, and the reference is the diagonal of the dense Hessian
(``jax.hessian`` over the raveled parameters). Two points: at initialization (large residuals p - y, so H - G is as
large as H) and after ``--train-steps`` Adam steps on the batch itself (small residuals, H close to the GGN G).

Estimators, with their cost counted in Hessian-vector-product equivalents (HVPs) as in the docstring of
``jaxforget.curvature.hutchinson_residual_diagonal``: an HVP is 1, a GGN-vector product 1, a gradient (or a batched
vector-Jacobian product) 1/2. So:

- ``hutchinson``: ``jf.hutchinson_diagonal`` with K Rademacher probes, cost K;
- ``ggn``: the exact GGN diagonal ``jf.ggn_diagonal`` (T * V batched vector-Jacobian products, cost T * V / 2 = 10),
  deterministic and biased for diag(H);
- ``gnb``: ``jf.gnb_diagonal`` (Monte Carlo GGN, labels sampled from the model's softmax) with S samples: S
  vector-Jacobian products per example, i.e. S batched ones, cost S / 2 whatever T and V (so S = T * V samples cost
  as much as the exact GGN);
- ``residual+ggn``: ``curvature.hutchinson_residual_diagonal`` with the exact diag(G) and K probes (an HVP and a
  GGN-vector product each), cost T * V / 2 + 2 K;
- ``residual+gnb``: the same with ``ggn=`` a ``gnb_diagonal`` estimate of S samples, cost S / 2 + 2 K; two splits of
  a budget, S = T * V (the GGN part costs what the exact one does) and half the budget each (S = budget).

Each stochastic estimator takes the budget's largest affordable K (or S); a row records the cost it actually spent
(at most the budget). For each estimator and budget: the mean and standard deviation (ddof = 1) over ``--keys`` keys
of the relative error against diag(H) and of the recall of diag(H)'s top 1%, 10% and 25% entries (2, 24 and 60 of
the 241). Costs are counted, not timed (the counting is conservative for the residual estimator: see the docstring).
``selection_by_cost`` names, per budget and point, the estimator of highest mean top-10% recall among those that
cost at most that budget, computed from the rows.

From the repository root::

    python benchmarks/curvature_transformer.py          # writes benchmarks/results/curvature-transformer-<device>.json
    python benchmarks/curvature_transformer.py --quick  # smoke check: 3 keys, budget 40; writes ...-quick.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from rich.console import Console
from rich.table import Table

import jaxforget as jf
from jaxforget import curvature
from jaxforget.atomic import write_json_atomic
from jaxforget.metrics import relative_error, top_k_recall

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
BATCH, LENGTH, VOCAB = 6, 4, 5
BUDGETS = (10, 20, 40, 80, 160)
QUICK_BUDGETS = (40,)
RECALL_FRACTIONS = {"recall@1%": 0.01, "recall@10%": 0.1, "recall@25%": 0.25}
SELECTION_METRIC = "recall@10%"
EXACT_GGN_COST = LENGTH * VOCAB / 2  # T * V batched vector-Jacobian products at half an HVP each
KEY_IMPL = "rbg"  # the keys of tests/test_curvature_sequences.py (its conftest sets rbg), so the same problem
# Compiling, not running, takes the time on a problem this small; XLA's backend optimizations off halve it.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class TinyTransformer(nn.Module):
    """Token and position embeddings, one pre-LayerNorm block (causal attention, GELU MLP), a final Dense."""

    vocab: int = VOCAB
    features: int = 4
    heads: int = 2

    @nn.compact
    def __call__(self, tokens):
        positions = jnp.arange(tokens.shape[1])
        x = nn.Embed(self.vocab, self.features)(tokens) + nn.Embed(tokens.shape[1], self.features)(positions)
        h = nn.LayerNorm()(x)
        attention = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.features)
        x = x + attention(h, h, mask=nn.make_causal_mask(tokens))
        h = nn.LayerNorm()(x)
        x = x + nn.Dense(self.features)(nn.gelu(nn.Dense(2 * self.features)(h)))
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


MODEL = TinyTransformer()


def logits_fn(params, tokens):
    return MODEL.apply({"params": params}, tokens)


def loss_fn(params, batch):
    """The softmax cross-entropy averaged over all B * T tokens."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, batch.inputs), batch.labels).mean()


def key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl=KEY_IMPL)


def flat(tree) -> jax.Array:
    return ravel_pytree(tree)[0]


# ----------------------------------------------------------------------------------------------------------------
# The problem.


class Problem(NamedTuple):
    name: str
    train_steps: int
    params: Any
    batch: jf.Batch
    loss: float
    hessian_diagonal: np.ndarray  # diag of the dense float64 Hessian
    ggn_diagonal: np.ndarray  # jf.ggn_diagonal, exact


def to_float64(tree):
    cast = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree)


@jit
def dense_hessian_diagonal(params, batch) -> jax.Array:
    raveled, unravel = ravel_pytree(params)
    return jnp.diag(jax.hessian(lambda f: loss_fn(unravel(f), batch))(raveled))


@jit
def exact_ggn(params, inputs) -> jax.Array:
    return flat(jf.ggn_diagonal(logits_fn, params, inputs))


def make_problem(name: str, train_steps: int) -> Problem:
    """The Transformer at initialization, or after ``train_steps`` Adam steps (learning rate 1e-2) on the batch."""
    tokens = jax.random.randint(key(1), (BATCH, LENGTH), 0, VOCAB)
    noise = jax.random.randint(key(2), tokens.shape, 0, VOCAB)
    labels = jnp.where(jax.random.uniform(key(3), tokens.shape) < 0.2, noise, (tokens + 1) % VOCAB)
    batch = jf.Batch(tokens, labels)
    params = to_float64(jit(MODEL.init)(key(0), tokens)["params"])
    if train_steps:
        optimizer = optax.adam(1e-2)

        def step(carry, _):
            p, state = carry
            updates, state = optimizer.update(jax.grad(loss_fn)(p, batch), state)
            return (optax.apply_updates(p, updates), state), None

        train = jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), None, length=train_steps)[0][0])
        params = train(params)
    return Problem(
        name,
        train_steps,
        params,
        batch,
        float(jit(loss_fn)(params, batch)),
        np.asarray(dense_hessian_diagonal(params, batch)),
        np.asarray(exact_ggn(params, tokens)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Estimators, each vmapped over keys: [keys] -> [keys, P].


@functools.partial(jit, static_argnames="num_probes")
def hutchinson_runs(params, batch, keys, *, num_probes):
    one = lambda k: flat(jf.hutchinson_diagonal(loss_fn, params, batch, k, num_probes=num_probes))
    return jax.vmap(one)(keys)


@functools.partial(jit, static_argnames="num_samples")
def gnb_runs(params, inputs, keys, *, num_samples):
    one = lambda k: flat(jf.gnb_diagonal(logits_fn, params, inputs, k, num_samples=num_samples))
    return jax.vmap(one)(keys)


@functools.partial(jit, static_argnames="num_probes")
def residual_runs(params, batch, ggns, keys, *, num_probes):
    """``ggns``: one raveled diag(G) (or estimate of it) per key, [keys, P]."""
    unravel = ravel_pytree(params)[1]

    def one(ggn, k):
        estimate = curvature.hutchinson_residual_diagonal(
            loss_fn, logits_fn, params, batch, k, num_probes=num_probes, ggn=unravel(ggn)
        )
        return flat(estimate)

    return jax.vmap(one)(ggns, keys)


def gnb_keys(keys: jax.Array) -> jax.Array:
    """The label-sampling keys, independent of the probe keys (the probes of residual+gnb are residual+ggn's)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


class Config(NamedTuple):
    estimator: str
    budget: int | None  # None: the exact GGN, which has one cost
    cost: float
    settings: dict[str, int]
    run: Callable[[Problem, jax.Array], np.ndarray]  # (problem, keys) -> [keys, P]


def configs(budgets: tuple[int, ...]) -> list[Config]:
    """Every estimator at every budget it can afford, taking the largest probe and sample counts within it."""

    def hutchinson(k):
        return lambda p, keys: hutchinson_runs(p.params, p.batch, keys, num_probes=k)

    def gnb(s):
        return lambda p, keys: gnb_runs(p.params, p.batch.inputs, gnb_keys(keys), num_samples=s)

    def residual_exact(k):
        return lambda p, keys: residual_runs(
            p.params, p.batch, np.broadcast_to(p.ggn_diagonal, (len(keys), p.ggn_diagonal.size)), keys, num_probes=k
        )

    def residual_gnb(s, k):
        return lambda p, keys: residual_runs(p.params, p.batch, gnb(s)(p, keys), keys, num_probes=k)

    exact = lambda p, keys: np.broadcast_to(p.ggn_diagonal, (len(keys), p.ggn_diagonal.size))
    rows = [Config("ggn", None, EXACT_GGN_COST, {}, exact)]
    for budget in budgets:
        rows.append(Config("hutchinson", budget, budget, {"num_probes": budget}, hutchinson(budget)))
        rows.append(Config("gnb", budget, budget, {"num_samples": 2 * budget}, gnb(2 * budget)))
        probes = int((budget - EXACT_GGN_COST) // 2)
        if probes >= 1:
            cost = EXACT_GGN_COST + 2 * probes
            rows.append(Config("residual+ggn", budget, cost, {"num_probes": probes}, residual_exact(probes)))
            samples = LENGTH * VOCAB
            settings = {"num_samples": samples, "num_probes": probes}
            rows.append(Config("residual+gnb(S=T*V)", budget, cost, settings, residual_gnb(samples, probes)))
        samples, probes = budget, budget // 4
        if probes >= 1 and samples != LENGTH * VOCAB:  # at S = T * V the half split is the row above
            settings = {"num_samples": samples, "num_probes": probes}
            cost = samples / 2 + 2 * probes
            rows.append(Config("residual+gnb(half)", budget, cost, settings, residual_gnb(samples, probes)))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Scoring.


def score(estimates: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Per key and summarized: the relative error against ``reference`` and the top-k recalls of its entries."""
    reference = jnp.asarray(reference)
    per_key = {"rel_error": [float(relative_error(jnp.asarray(e), reference)) for e in estimates]}
    for name, fraction in RECALL_FRACTIONS.items():
        k = max(1, round(fraction * reference.size))  # top_k_recall's k; its float32 mean snapped to a multiple of 1/k
        per_key[name] = [round(float(top_k_recall(jnp.asarray(e), reference, fraction)) * k) / k for e in estimates]
    summary = {}
    for name, values in per_key.items():
        summary[f"{name}_mean"] = float(np.mean(values))
        summary[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {**summary, "per_key": per_key}


def measure(problem: Problem, budgets: tuple[int, ...], keys: jax.Array, console: Console) -> list[dict]:
    rows = []
    for config in configs(budgets):
        console.log(f"{problem.name}: {config.estimator} {config.settings}")
        estimates = np.asarray(config.run(problem, keys))
        rows.append(
            {
                "point": problem.name,
                "estimator": config.estimator,
                "budget": config.budget,
                "cost": config.cost,
                "settings": config.settings,
                **score(estimates, problem.hessian_diagonal),
            }
        )
    return rows


def selection_by_cost(rows: list[dict], point: str, budgets: tuple[int, ...], metric: str) -> list[dict]:
    """Per budget, the estimators that cost at most it (the exact GGN at any budget it fits), ranked by the mean of
    ``metric`` (ties: the lower mean error first)."""
    summary = []
    for budget in budgets:
        candidates = [
            r
            for r in rows
            if r["point"] == point and r["cost"] <= budget and (r["budget"] is None or r["budget"] == budget)
        ]
        ranked = sorted(candidates, key=lambda r: (-r[f"{metric}_mean"], r["rel_error_mean"]))
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        summary.append(
            {
                "budget": budget,
                "best": best["estimator"],
                "best_settings": best["settings"],
                "best_cost": best["cost"],
                f"best_{metric}_mean": best[f"{metric}_mean"],
                f"best_{metric}_std": best[f"{metric}_std"],
                "best_rel_error_mean": best["rel_error_mean"],
                "runner_up": None if second is None else second["estimator"],
                "runner_up_settings": None if second is None else second["settings"],
                f"runner_up_{metric}_mean": None if second is None else second[f"{metric}_mean"],
                f"runner_up_{metric}_std": None if second is None else second[f"{metric}_std"],
                "lowest_error": min(candidates, key=lambda r: r["rel_error_mean"])["estimator"],
            }
        )
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Output.


def print_table(problems: list[Problem], rows: list[dict], selection: dict, num_keys: int, console: Console) -> None:
    for problem in problems:
        ggn_error = float(relative_error(jnp.asarray(problem.ggn_diagonal), jnp.asarray(problem.hessian_diagonal)))
        table = Table(
            title=f"{problem.name} ({problem.train_steps} Adam steps, loss {problem.loss:.3f}; "
            f"|diag(G) - diag(H)| / |diag(H)| = {ggn_error:.3f}): mean ± std over {num_keys} keys vs diag(H)"
        )
        for column in ("budget", "estimator", "settings", "cost", "rel error", *RECALL_FRACTIONS):
            table.add_column(column, justify="left" if column in ("estimator", "settings") else "right")
        for row in rows:
            if row["point"] != problem.name:
                continue
            table.add_row(
                "-" if row["budget"] is None else str(row["budget"]),
                row["estimator"],
                ", ".join(f"{k}={v}" for k, v in row["settings"].items()),
                f"{row['cost']:g}",
                f"{row['rel_error_mean']:.3f} ± {row['rel_error_std']:.3f}",
                *(f"{row[f'{name}_mean']:.2f} ± {row[f'{name}_std']:.2f}" for name in RECALL_FRACTIONS),
            )
        console.print(table)
    for point, summary in selection.items():
        console.print(f"best {SELECTION_METRIC} at each cost, {point}:")
        for entry in summary:
            console.print(
                f"  budget {entry['budget']:4d}: {entry['best']} {entry['best_settings']} "
                f"({entry[f'best_{SELECTION_METRIC}_mean']:.2f}; runner-up {entry['runner_up']} "
                f"{_fmt(entry[f'runner_up_{SELECTION_METRIC}_mean'])}); lowest error: {entry['lowest_error']}"
            )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "jaxforget"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="costs in HVP equivalents")
    parser.add_argument("--keys", type=int, default=8, help="independent keys per estimator and budget")
    parser.add_argument("--train-steps", type=int, default=100, help="Adam steps of the trained point")
    parser.add_argument("--seed", type=int, default=0, help="seeds the estimators' keys (not the problem)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file to write (default: see above)")
    parser.add_argument("--quick", action="store_true", help=f"smoke check: 3 keys, budgets {QUICK_BUDGETS}")
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.budgets = 3, list(QUICK_BUDGETS)
    if args.keys < 1 or min(args.budgets) < 1:
        parser.error("--keys and --budgets must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    command = shlex.join(["python", *(sys.argv if argv is None else [os.path.relpath(__file__), *argv])])
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    console = Console(width=None if sys.stdout.isatty() else 160)
    device = jax.devices()[0].platform
    budgets = tuple(sorted(set(args.budgets)))

    console.log("the two points and their dense float64 Hessians")
    problems = [make_problem("untrained", 0), make_problem("trained", args.train_steps)]
    keys = jax.random.split(key(args.seed), args.keys)
    rows = [row for problem in problems for row in measure(problem, budgets, keys, console)]
    selection = {p.name: selection_by_cost(rows, p.name, budgets, SELECTION_METRIC) for p in problems}
    print_table(problems, rows, selection, args.keys, console)

    num_params = int(problems[0].hessian_diagonal.size)
    points = {
        p.name: {
            "train_steps": p.train_steps,
            "loss": p.loss,
            "ggn_vs_hessian_diagonal_rel_error": float(
                relative_error(jnp.asarray(p.ggn_diagonal), jnp.asarray(p.hessian_diagonal))
            ),
            "hessian_diagonal_min": float(p.hessian_diagonal.min()),
            "hessian_diagonal_max": float(p.hessian_diagonal.max()),
        }
        for p in problems
    }
    payload = {
        "metadata": {
            "command": command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device,
            "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "versions": versions(),
            "git_commit": git_commit(),
            "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
            "problem": {
                "model": "TinyTransformer(features=4, heads=2), one pre-LayerNorm block",
                "batch": BATCH,
                "length": LENGTH,
                "vocab": VOCAB,
                "num_params": num_params,
                "dtype": "float64",
                "key_impl": KEY_IMPL,
                "reference": "diag of the dense Hessian (jax.hessian over the raveled parameters)",
            },
            "cost_unit": "Hessian-vector products: HVP 1, GGN-vector product 1, gradient or batched VJP 1/2; "
            f"exact GGN T*V/2 = {EXACT_GGN_COST:g}, gnb S samples S/2, residual probe 2",
            "recall_k": {name: max(1, round(f * num_params)) for name, f in RECALL_FRACTIONS.items()},
            "std": "over keys, ddof=1",
        },
        "points": points,
        "selection_metric": SELECTION_METRIC,
        "selection_by_cost": selection,
        "rows": rows,
    }
    default = RESULTS_DIR / f"curvature-transformer-{device}{'-quick' if args.quick else ''}.json"
    path = args.out or default
    write_json_atomic(path, payload)
    console.log(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
