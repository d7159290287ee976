"""Results of the main job: rows aggregated over seeds, a console table, Markdown, JSON and a plot.

A row is one model (the poisoned one, the retrained reference, or one selection/update pair) with the scores of
:mod:`jaxforget.pipeline`'s evaluate stage. Over several seeds each score becomes a mean with a 95% Student-t
interval.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxforget.atomic import open_atomic, write_json_atomic, write_text_atomic

__all__ = ["COLUMNS", "aggregate", "format_table", "markdown_table", "plot_results", "write_results"]

# (key, header, format): every score the table shows, in order.
COLUMNS = (
    ("fraction", "params", "{:.2%}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("accuracy_restored", "restored", "{:+.2f}"),
    ("attack_success", "attack", "{:.3f}"),
    ("group_accuracy", "Z~ acc", "{:.3f}"),
    ("fidelity_test", "agree test", "{:.3f}"),
    ("fidelity_group", "agree Z", "{:.3f}"),
    ("mia_auc", "MIA AUC", "{:.3f}"),
    ("relearn_steps", "relearn", "{:.1f}"),
    ("seconds", "time s", "{:.2f}"),
    ("gradient_equivalents", "grad-eq", "{:.0f}"),
)


def _interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% Student-t interval (0 for one value)."""
    values = np.asarray(values, float)
    mean = float(values.mean())
    if values.size < 2:
        return mean, 0.0
    from scipy import stats

    spread = values.std(ddof=1)
    if spread <= 1e-12 * max(1.0, abs(mean)):  # equal values up to rounding
        return mean, 0.0
    return mean, float(stats.t.ppf(0.975, values.size - 1) * spread / math.sqrt(values.size))


def aggregate(runs: Sequence[Sequence[dict[str, Any]]], *, relearn_cap: int) -> list[dict[str, Any]]:
    """Merges the rows of several seeds (same methods, same order) into mean and interval per score.

    A relearning count of ``None`` (the effect never came back within the cap) counts as ``relearn_cap + 1`` in
    the mean, and the row records how many seeds hit the cap.

    Returns:
      One dict per method: ``method``, ``selection``, ``update``, ``seeds``, and for each score ``key`` the
      ``key`` (mean) and ``key_ci`` (half-width).
    """
    merged = []
    for rows in zip(*runs, strict=True):
        first = rows[0]
        row = {name: first[name] for name in ("method", "selection", "update")}
        row["seeds"] = len(rows)
        for key, _, _ in COLUMNS:
            values = [r.get(key) for r in rows]
            if key == "relearn_steps":
                row["relearn_capped"] = sum(v is None for v in values)
                values = [relearn_cap + 1 if v is None else v for v in values]
            finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
            row[key], row[f"{key}_ci"] = _interval(finite) if finite else (None, None)
        merged.append(row)
    return merged


def _cell(row: dict[str, Any], key: str, fmt: str, *, relearn_cap: int) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "relearn_steps" and row.get("relearn_capped") == row.get("seeds"):
        return f">{relearn_cap}"
    text = fmt.format(value)
    half = row.get(f"{key}_ci")
    if row.get("seeds", 1) > 1 and half:
        text += " ±" + fmt.format(half).lstrip("+")
    return text


def _cells(rows: Sequence[dict[str, Any]], relearn_cap: int) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [title for _, title, _ in COLUMNS]
    body = [[row["method"]] + [_cell(row, k, f, relearn_cap=relearn_cap) for k, _, f in COLUMNS] for row in rows]
    return header, body


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


def plot_results(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str) -> pathlib.Path:
    """Four scores per selection rule, one group of bars per update, the baselines as lines; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in rows if r["update"] is not None]
    updates = list(dict.fromkeys(r["update"] for r in methods))
    selections = list(dict.fromkeys(r["selection"] for r in methods))
    baselines = {r["method"]: r for r in rows if r["update"] is None}
    panels = (
        ("group_accuracy", "accuracy on Z~ (corrected labels)"),
        ("attack_success", "attack success (held-out, poisoned like Z)"),
        ("mia_auc", "membership-inference AUC on Z"),
        ("test_accuracy", "test accuracy"),
    )
    figure, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    axes = axes.ravel()
    width = 0.8 / max(1, len(selections))
    colors = plt.get_cmap("tab10")
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
            ax.bar(positions, values, width, yerr=errors, label=selection_name, color=colors(j % 10))
            shown += values
        for name, style in (("poisoned", "--"), ("retrained", ":")):
            if name in baselines and baselines[name].get(key) is not None:
                ax.axhline(baselines[name][key], color="black", linestyle=style, linewidth=1, label=name)
                shown.append(baselines[name][key])
        ax.set_xticks(range(len(updates)), updates)
        ax.set_title(label, fontsize=9)
        if key == "test_accuracy" and shown:  # zoomed: the differences are a few points
            ax.set_ylim(max(0.0, min(shown) - 0.03), min(1.02, max(shown) + 0.02))
        else:
            ax.set_ylim(0.0, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path = pathlib.Path(path)
    try:
        with open_atomic(path, "wb") as stream:
            figure.savefig(stream, format="png", dpi=110)
    finally:
        plt.close(figure)
    return path


def write_results(
    out: str | os.PathLike, record: dict[str, Any], rows: Sequence[dict[str, Any]], *, relearn_cap: int, title: str
) -> list[pathlib.Path]:
    """Writes ``results.json`` (``record`` plus the rows), ``results.md`` and ``results.png`` into ``out``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, relearn_cap=relearn_cap)
    return [
        write_json_atomic(out / "results.json", {**record, "rows": list(rows)}),
        write_text_atomic(out / "results.md", f"# {title}\n\n{table}\n"),
        plot_results(rows, out / "results.png", title=title),
    ]
