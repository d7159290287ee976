"""Results of the main job: rows aggregated over seeds, paired comparisons, a console table, Markdown, JSON, a plot.

A row is one model (the poisoned one, the retrained reference, or one selection/update pair) with the scores of
:mod:`jaxforget.pipeline`'s evaluate stage. Over several seeds each score becomes a mean with a 95% Student-t
interval, except the relearning count: a run that hit the cap has no count (``None``, censored), so the count becomes
the median over seeds with a censored run ranked above every observed count, plus the share of seeds that hit the cap.
:func:`paired_comparisons` sets each selection rule against a reference rule seed by seed (same data, same
initialization), which removes the seed-to-seed spread that the per-method intervals carry.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxforget.atomic import open_atomic, write_json_atomic, write_text_atomic

__all__ = [
    "COLUMNS",
    "CANARY_PAIRED_METRICS",
    "FORGETTING_PAIRED_METRICS",
    "HIGHER_IS_BETTER",
    "PAIRED_METRICS",
    "aggregate",
    "format_table",
    "markdown_table",
    "paired_comparisons",
    "paired_markdown",
    "plot_results",
    "write_results",
]

# (key, header, format): every score the table shows, in order.
COLUMNS = (
    ("fraction", "params", "{:.2%}"),
    ("top_k_recall", "recall", "{:.2f}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("accuracy_restored", "restored", "{:+.2f}"),
    ("attack_success", "attack", "{:.3f}"),
    ("group_accuracy", "Z~ acc", "{:.3f}"),
    ("fidelity_test", "agree test", "{:.3f}"),
    ("fidelity_group", "agree Z", "{:.3f}"),
    ("mia_auc", "MIA AUC", "{:.3f}"),
    ("relearn_steps", "relearn (median)", "{:g}"),
    ("seconds", "time s", "{:.2f}"),
    ("gradient_equivalents", "grad-eq", "{:.0f}"),
    ("update_norm", "|step|", "{:.3g}"),
    ("curvature_share", "curv>10%", "{:.0%}"),
    ("exposure", "exposure", "{:.2f}"),
    ("bits_per_char", "bits/char", "{:.3f}"),
    ("forgetting_score", "forget score", "{:.3f}"),
    ("final_score", "final", "{:.3f}"),
    ("lira_auc", "LiRA AUC", "{:.3f}"),
    ("forget_confidence", "Z conf", "{:+.2f}"),
    ("family_seconds_per_model", "s/model", "{:.3f}"),
)
# Scores of one scenario (the canary's) or of --forgetting only: their columns show only when some row has them.
_OPTIONAL = (
    "exposure",
    "bits_per_char",
    "forgetting_score",
    "final_score",
    "lira_auc",
    "forget_confidence",
    "family_seconds_per_model",
)

# The scores :func:`paired_comparisons` compares by default.
PAIRED_METRICS = ("group_accuracy", "test_accuracy", "attack_success", "mia_auc", "fidelity_group", "relearn_steps")
# The canary's: how much of the secret is left (exposure, digits extracted), membership, and the utility in bits.
CANARY_PAIRED_METRICS = ("exposure", "attack_success", "mia_auc", "bits_per_char", "relearn_steps")
# Added to the paired scores of a run with --forgetting.
FORGETTING_PAIRED_METRICS = ("forgetting_score", "final_score", "lira_auc")

# Whether a higher score is the better one. For ``mia_auc`` lower counts as better: a simplification that reads the
# AUC as "closer to chance (0.5) from above", which ignores that an AUC well below 0.5 leaks membership too.
HIGHER_IS_BETTER = {
    "group_accuracy": True,
    "test_accuracy": True,
    "attack_success": False,
    "mia_auc": False,
    "fidelity_group": True,
    "relearn_steps": True,
    "exposure": False,
    "bits_per_char": False,
    "forgetting_score": True,
    "final_score": True,
    "lira_auc": False,  # an AUC below 0.5 is as distinguishable, but unlearned models rarely look *less* trained on Z
}


def _missing(value: Any) -> bool:
    """Whether a score is absent: ``None`` or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_runs(runs: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Raises ValueError unless ``runs`` is non-empty and every seed lists the same methods in the same order."""
    if not runs:
        raise ValueError("runs: is empty; pass one list of rows per seed.")
    methods = [row["method"] for row in runs[0]]
    for index, rows in enumerate(runs[1:], 1):
        other = [row["method"] for row in rows]
        if other != methods:
            raise ValueError(
                f"runs: runs[{index}] has methods {other} but runs[0] has {methods}; pass every seed's rows for the "
                "same methods in the same order."
            )


def _interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of a two-sided Student-t interval at ``confidence`` (0 for one or equal values)."""
    values = np.asarray(values, float)
    mean = float(values.mean())
    if values.size < 2:
        return mean, 0.0
    from scipy import stats

    spread = values.std(ddof=1)
    if spread <= 1e-12 * max(1.0, abs(mean)):  # equal values up to rounding
        return mean, 0.0
    return mean, float(stats.t.ppf((1 + confidence) / 2, values.size - 1) * spread / math.sqrt(values.size))


def _check_relearn(values: Sequence[int | None], relearn_cap: int) -> None:
    """Raises ValueError when an observed relearning count exceeds the cap (a censored one must rank above it)."""
    over = [v for v in values if v is not None and v > relearn_cap]
    if over:
        raise ValueError(
            f"relearn_cap: {relearn_cap} is below the observed relearning counts {over}; pass the cap the runs used "
            "(RunConfig.relearn_steps)."
        )


def _relearn_summary(values: Sequence[int | None], relearn_cap: int) -> dict[str, Any]:
    """Median relearning count over seeds, a censored count (``None``) ranking above every observed count.

    Args:
      values: one count per seed, ``None`` where the run hit the cap.
      relearn_cap: the cap on the relearning steps; every observed count must be at most this.

    Returns:
      ``relearn_steps`` (the median, ``None`` when censored), ``relearn_steps_censored`` (whether the median is
      above the cap: at least half the seeds hit it), ``relearn_steps_ci`` (``None``: no t-interval for a median of
      censored counts), ``relearn_capped`` (seeds that hit the cap) and ``relearn_capped_share`` (their share).
    """
    _check_relearn(values, relearn_cap)
    steps = np.array([np.inf if v is None else v for v in values], float)
    median = float(np.median(steps))
    capped = int(np.isinf(steps).sum())
    return {
        "relearn_steps": None if math.isinf(median) else median,
        "relearn_steps_censored": math.isinf(median),
        "relearn_steps_ci": None,
        "relearn_capped": capped,
        "relearn_capped_share": capped / steps.size,
    }


def aggregate(runs: Sequence[Sequence[dict[str, Any]]], *, relearn_cap: int) -> list[dict[str, Any]]:
    """Merges the rows of several seeds (same methods, same order) into a summary per score.

    Every score but the relearning count becomes the mean over the seeds that have it (``None`` and NaN are
    skipped) with the half-width of a 95% Student-t interval. The relearning count is censored: ``None`` means the
    effect never came back within ``relearn_cap`` steps, so it becomes the median over seeds with a censored count
    ranked above every observed one (see :func:`_relearn_summary`).

    Args:
      runs: one list of rows per seed, each with the same methods in the same order.
      relearn_cap: the cap on the relearning steps; every observed count must be at most this.

    Returns:
      One dict per method: ``method``, ``selection``, ``update``, ``seeds``; for each score ``key`` but the
      relearning count ``key`` (mean) and ``key_ci`` (half-width); ``relearn_steps`` (median or ``None``),
      ``relearn_steps_censored``, ``relearn_steps_ci`` (``None``), ``relearn_capped`` and ``relearn_capped_share``;
      and ``converged``: for an iterative solver, whether it converged on every seed (``None`` for other methods).

    Raises:
      ValueError: ``runs`` is empty or its seeds list different methods, or a relearning count exceeds the cap.
    """
    _check_runs(runs)
    merged = []
    for rows in zip(*runs, strict=True):
        first = rows[0]
        row = {name: first[name] for name in ("method", "selection", "update")}
        row["seeds"] = len(rows)
        for key, _, _ in COLUMNS:
            values = [r.get(key) for r in rows]
            if key == "relearn_steps":
                row.update(_relearn_summary(values, relearn_cap))
                continue
            present = [v for v in values if not _missing(v)]
            row[key], row[f"{key}_ci"] = _interval(present) if present else (None, None)
        solved = [r["converged"] for r in rows if r.get("converged") is not None]
        row["converged"] = all(solved) if solved else None
        if len(rows) == 1 and first.get("forgetting_interval") is not None:
            row["forgetting_interval"] = first["forgetting_interval"]
        merged.append(row)
    return merged


def _check_paired_arguments(metrics: Sequence[str], confidence: float, resamples: int) -> None:
    """Raises ValueError for metrics without a known better direction, a confidence outside (0, 1) or no resamples."""
    if isinstance(metrics, str):
        raise ValueError(f"metrics: {metrics!r} is a string; pass a sequence of score keys, e.g. ({metrics!r},).")
    unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(
            f"metrics: {unknown} have no known better direction; pass keys of HIGHER_IS_BETTER: "
            f"{list(HIGHER_IS_BETTER)}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: {confidence!r} must lie strictly between 0 and 1, e.g. 0.95.")
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 1:
        raise ValueError(f"resamples: {resamples!r} must be a positive int, e.g. 10_000.")


def _paired_differences(pairs: Sequence[tuple[Any, Any]], metric: str, relearn_cap: int) -> np.ndarray:
    """``reference - other`` per seed over the seeds where both scores are present.

    A censored relearning count (``None``) counts as ``relearn_cap + 1``, so no seed is dropped for it.
    """
    if metric == "relearn_steps":
        for pair in pairs:
            _check_relearn(pair, relearn_cap)
        pairs = [tuple(relearn_cap + 1 if v is None else v for v in pair) for pair in pairs]
    return np.array([a - b for a, b in pairs if not (_missing(a) or _missing(b))], float)


def _bootstrap_interval(
    differences: np.ndarray, *, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean difference, resampling seeds with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, differences.size, size=(resamples, differences.size))
    means = differences[picks].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is exactly zero (scipy gives NaN there).

    ``zero_method="zsplit"``: a seed on which both rules score the same (common for accuracies on a few hundred
    examples, and for two censored relearning counts) is evidence of no difference, so it keeps its rank, split half
    to each side, rather than being dropped ("wilcox") or ranked and then left out of the statistic ("pratt"). Up to
    13 pairs with ties or zeros scipy runs an exact sign-flip permutation test, in which the three choices agree;
    beyond that the normal approximation applies, where "zsplit" keeps the ties in the variance and is the most
    conservative of the three.
    """
    if not differences.any():
        return 1.0
    from scipy import stats

    return float(stats.wilcoxon(differences, zero_method="zsplit").pvalue)


def _better(low: float, high: float, higher_is_better: bool) -> str:
    """Which side the whole interval ``[low, high]`` of ``reference - other`` favours: reference, other, neither."""
    if low > 0:
        return "reference" if higher_is_better else "other"
    if high < 0:
        return "other" if higher_is_better else "reference"
    return "neither"


def _paired_statistics(
    differences: np.ndarray, *, higher_is_better: bool, confidence: float, resamples: int, seed: int
) -> dict[str, Any]:
    """The summary of one set of paired differences; intervals, p-value and a verdict need at least two pairs."""
    n = int(differences.size)
    summary = {
        "n": n,
        "mean_difference": float(differences.mean()) if n else None,
        "ci_low": None,
        "ci_high": None,
        "t_ci_low": None,
        "t_ci_high": None,
        "wins": int((differences > 0).sum()),
        "losses": int((differences < 0).sum()),
        "ties": int((differences == 0).sum()),
        "wilcoxon_p": None,
        "better": "neither",
    }
    if n < 2:
        return summary
    low, high = _bootstrap_interval(differences, confidence=confidence, resamples=resamples, seed=seed)
    mean, half = _interval(differences, confidence)
    summary.update(
        ci_low=low,
        ci_high=high,
        t_ci_low=mean - half,
        t_ci_high=mean + half,
        wilcoxon_p=_wilcoxon_p(differences),
        better=_better(low, high, higher_is_better),
    )
    return summary


def paired_comparisons(
    runs: Sequence[Sequence[dict[str, Any]]],
    *,
    reference: str = "hessian-largest",
    metrics: Sequence[str] = PAIRED_METRICS,
    relearn_cap: int,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Sets the reference selection rule against every other one, seed by seed, for each update and score.

    For each update (in order of appearance) and each other selection with a row for that update, the differences
    ``d_s = reference_s - other_s`` of the rows ``f"{reference}/{update}"`` and ``f"{other}/{update}"`` are taken
    over the seeds where both scores are present. A censored relearning count (``None``: the cap was hit) counts as
    ``relearn_cap + 1``: a censored reference count makes ``d_s`` a lower bound of the true difference, a censored
    other count makes it an upper bound, and two censored counts make it a tie.

    Every comparison draws its bootstrap resamples from a fresh ``numpy.random.default_rng(seed)``, so a result does
    not depend on which other comparisons were asked for. With fewer than two pairs there is no interval, no
    p-value, and the verdict is "neither".

    Args:
      runs: one list of rows per seed, each with the same methods in the same order (as for :func:`aggregate`).
      reference: the selection rule to compare the others against.
      metrics: score keys to compare, each a key of :data:`HIGHER_IS_BETTER`.
      relearn_cap: the cap on the relearning steps the runs used.
      confidence: coverage of both intervals.
      resamples: bootstrap resamples.
      seed: seed of the bootstrap's random generator.

    Returns:
      One dict per (update, other selection, metric): ``update``, ``reference``, ``other``, ``metric``,
      ``confidence``, ``n`` (pairs), ``mean_difference``, ``ci_low`` and ``ci_high`` (percentile bootstrap interval
      of the mean difference), ``t_ci_low`` and ``t_ci_high`` (Student-t interval), ``wins``, ``losses`` and
      ``ties`` (seeds with d > 0, d < 0, d == 0), ``wilcoxon_p`` (two-sided signed-rank p-value, see
      :func:`_wilcoxon_p`; ``None`` below two pairs) and ``better``: "reference" or "other" when the whole bootstrap
      interval lies on that rule's better side (see :data:`HIGHER_IS_BETTER`), else "neither".

    Raises:
      ValueError: ``runs`` is empty or its seeds list different methods; ``reference`` is no selection in the rows;
        a metric has no known better direction; ``confidence`` or ``resamples`` is out of range; a relearning
        count exceeds ``relearn_cap``.
    """
    _check_runs(runs)
    _check_paired_arguments(metrics, confidence, resamples)
    first = runs[0]
    selections = list(dict.fromkeys(row["selection"] for row in first if row["selection"] is not None))
    if reference not in selections:
        raise ValueError(f"reference: {reference!r} is no selection in the rows; pass one of {selections}.")
    position = {row["method"]: index for index, row in enumerate(first)}
    comparisons = []
    for update in dict.fromkeys(row["update"] for row in first if row["update"] is not None):
        reference_method = f"{reference}/{update}"
        if reference_method not in position:
            continue
        for other in selections:
            other_method = f"{other}/{update}"
            if other == reference or other_method not in position:
                continue
            pairs = [(rows[position[reference_method]], rows[position[other_method]]) for rows in runs]
            for metric in metrics:
                differences = _paired_differences(
                    [(a.get(metric), b.get(metric)) for a, b in pairs], metric, relearn_cap
                )
                statistics = _paired_statistics(
                    differences,
                    higher_is_better=HIGHER_IS_BETTER[metric],
                    confidence=confidence,
                    resamples=resamples,
                    seed=seed,
                )
                comparisons.append(
                    {
                        "update": update,
                        "reference": reference,
                        "other": other,
                        "metric": metric,
                        "confidence": confidence,
                        **statistics,
                    }
                )
    return comparisons


def _relearn_cell(row: dict[str, Any], fmt: str, *, relearn_cap: int) -> str:
    """The median relearning count, ``>cap`` when censored, then the share of seeds that hit the cap if any."""
    if row.get("relearn_steps_censored"):
        text = f">{relearn_cap}"
    elif row.get("relearn_steps") is None:
        return "-"
    else:
        text = fmt.format(row["relearn_steps"])
    share = row.get("relearn_capped_share") or 0.0
    return f"{text} ({share:.0%} capped)" if share > 0 else text


def _cell(row: dict[str, Any], key: str, fmt: str, *, relearn_cap: int) -> str:
    """One table cell: the mean and its ``±`` half-width, or the relearning cell (see :func:`_relearn_cell`)."""
    if key == "relearn_steps":
        return _relearn_cell(row, fmt, relearn_cap=relearn_cap)
    value = row.get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    half = row.get(f"{key}_ci")
    if row.get("seeds", 1) > 1 and half:
        text += " ±" + fmt.format(half).lstrip("+")
    elif key == "forgetting_score" and row.get("forgetting_interval"):  # one seed: the bootstrap over models
        low, high = row["forgetting_interval"]
        text += f" [{low:.2f}, {high:.2f}]"
    return text


def _cells(rows: Sequence[dict[str, Any]], relearn_cap: int) -> tuple[list[str], list[list[str]]]:
    columns = [c for c in COLUMNS if c[0] not in _OPTIONAL or any(not _missing(row.get(c[0])) for row in rows)]
    header = ["method"] + [title for _, title, _ in columns]
    body = [[_method_label(row)] + [_cell(row, k, f, relearn_cap=relearn_cap) for k, _, f in columns] for row in rows]
    return header, body


def _method_label(row: dict[str, Any]) -> str:
    """The method's name, marked when its solver did not converge: such a row supports no conclusion."""
    return row["method"] + (" (not converged)" if row.get("converged") is False else "")


def format_table(rows: Sequence[dict[str, Any]], *, relearn_cap: int) -> str:
    """A fixed-width table for the console, one line per method, with a rule between update families."""
    header, body = _cells(rows, relearn_cap)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(header), "  ".join("-" * w for w in widths)]
    previous = None
    for row, cells in zip(rows, body, strict=True):
        if previous is not None and row["update"] != previous:
            lines.append("")
        lines.append(line(cells))
        previous = row["update"]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], *, relearn_cap: int) -> str:
    """The same table in Markdown."""
    header, body = _cells(rows, relearn_cap)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _difference_cell(comparison: Mapping[str, Any]) -> str:
    """``mean [low, high]`` with the bootstrap interval, the mean alone without one, ``-`` without pairs."""
    if comparison["mean_difference"] is None:
        return "-"
    text = _signed(comparison["mean_difference"])
    if comparison["ci_low"] is not None:
        text += f" [{_signed(comparison['ci_low'])}, {_signed(comparison['ci_high'])}]"
    return text


def paired_markdown(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`paired_comparisons`, one line per comparison.

    Args:
      comparisons: the dicts :func:`paired_comparisons` returns.

    Returns:
      The table: update, the other selection, metric, pairs, mean difference with its bootstrap interval (3
      decimals), wins/ties/losses of the reference, the Wilcoxon p-value (3 significant digits) and the verdict.
    """
    confidence = comparisons[0]["confidence"] if comparisons else 0.95
    header = [
        "update",
        "vs",
        "metric",
        "n",
        f"mean diff [{100 * confidence:g}% CI]",
        "wins/ties/losses",
        "Wilcoxon p",
        "better",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---:|---|"]
    for c in comparisons:
        p = "-" if c["wilcoxon_p"] is None else f"{c['wilcoxon_p']:.3g}"
        cells = [
            c["update"],
            c["other"],
            c["metric"],
            str(c["n"]),
            _difference_cell(c),
            f"{c['wins']}/{c['ties']}/{c['losses']}",
            p,
            c["better"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str) -> pathlib.Path:
    """Four scores per selection rule, one group of bars per update, the baselines as lines; written atomically."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    methods = [r for r in rows if r["update"] is not None]
    updates = list(dict.fromkeys(r["update"] for r in methods))
    selections = list(dict.fromkeys(r["selection"] for r in methods))
    baselines = {r["method"]: r for r in rows if r["update"] is None}
    canary = any(r.get("exposure") is not None for r in rows)
    membership = (
        ("forgetting_score", "forgetting score against the retrained models (1: as if retrained)")
        if any(r.get("forgetting_score") is not None for r in rows)
        else ("mia_auc", "membership-inference AUC on Z")
    )
    panels = (
        (
            ("exposure", "exposure of the secret, bits (lower: less memorized)"),
            ("attack_success", "share of the secret's digits greedy decoding extracts"),
            ("mia_auc", "membership-inference AUC on Z"),
            ("bits_per_char", "test bits per character (lower: better)"),
        )
        if canary
        else (
            ("group_accuracy", "accuracy on Z~ (corrected labels)"),
            ("attack_success", "attack success (held-out, poisoned like Z)"),
            membership,
            ("test_accuracy", "test accuracy"),
        )
    )
    figure = Figure(figsize=(14, 8.5))
    axes = figure.subplots(2, 2)
    axes = axes.ravel()
    width = 0.8 / max(1, len(selections))
    palette = "tab10" if len(selections) <= 10 else "tab20"  # one distinct color per selection rule
    colors = matplotlib.colormaps[palette]
    for ax, (key, label) in zip(axes, panels, strict=True):
        shown = []
        for j, selection_name in enumerate(selections):
            values, errors, positions = [], [], []
            for i, update in enumerate(updates):
                match = [r for r in methods if r["update"] == update and r["selection"] == selection_name]
                if match and match[0].get(key) is not None:
                    positions.append(i + (j - (len(selections) - 1) / 2) * width)
                    values.append(match[0][key])
                    errors.append(match[0].get(f"{key}_ci") or 0.0)
            ax.bar(positions, values, width, yerr=errors, label=selection_name, color=colors(j % colors.N))
            shown += values
        for name, style in (("poisoned", "--"), ("retrained", ":")):
            if name in baselines and baselines[name].get(key) is not None:
                ax.axhline(baselines[name][key], color="black", linestyle=style, linewidth=1, label=name)
                shown.append(baselines[name][key])
        ax.set_xticks(range(len(updates)), updates)
        ax.set_title(label, fontsize=9)
        if key in ("test_accuracy", "bits_per_char") and shown:  # zoomed: the differences are small
            spread = 0.03 if key == "test_accuracy" else 0.1
            ax.set_ylim(max(0.0, min(shown) - spread), max(shown) + spread)
        elif key == "exposure":
            ax.set_ylim(0.0, 1.05 * max(*shown, 1.0))
        else:
            ax.set_ylim(0.0, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path = pathlib.Path(path)
    with open_atomic(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=110)
    return path


def write_results(
    out: str | os.PathLike,
    record: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    *,
    relearn_cap: int,
    title: str,
    comparisons: Sequence[Mapping[str, Any]] | None = None,
) -> list[pathlib.Path]:
    """Writes ``results.json``, ``results.md`` and ``results.png`` into ``out``, each atomically.

    Args:
      out: the folder; created if missing.
      record: what ``results.json`` holds besides the rows (configuration, timings, per-seed rows).
      rows: the rows of :func:`aggregate`.
      relearn_cap: the cap on the relearning steps, shown as ``>cap`` for a censored median.
      title: the heading of ``results.md`` and the plot.
      comparisons: the dicts of :func:`paired_comparisons`; when given, ``results.json`` holds them under
        ``"paired"`` and ``results.md`` gets a second section with :func:`paired_markdown`.

    Returns:
      The paths written: ``results.json``, ``results.md``, ``results.png``.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**record, "rows": list(rows)}
    text = f"# {title}\n\n{markdown_table(rows, relearn_cap=relearn_cap)}\n"
    if comparisons is not None:
        payload["paired"] = list(comparisons)
        references = ", ".join(dict.fromkeys(c["reference"] for c in comparisons)) or "-"
        text += (
            "\n## Paired differences (reference minus other, by seed)\n\n"
            f"Reference: {references}. Interval: percentile bootstrap over seeds; p: two-sided Wilcoxon signed-rank; "
            f"a capped relearning count counts as {relearn_cap + 1}.\n\n{paired_markdown(comparisons)}\n"
        )
    return [
        write_json_atomic(out / "results.json", payload),
        write_text_atomic(out / "results.md", text),
        plot_results(rows, out / "results.png", title=title),
    ]
