"""Whether a run reproduces another one: the same numbers, up to the floating-point drift between machines.

Another CPU, thread count or XLA build sums in another order, so the last bits of every result differ; training
amplifies them until a few borderline samples change their predicted class. :data:`DRIFT` bounds, per metric, how
far two runs of the same command may differ from that cause alone. It was measured by running the default command
under execution changes that reorder floating-point sums on one machine (one core instead of two; XLA's fast-math
reassociation), which changed the trained weights in their last bits, and comparing every value with the committed
two-core run: 248 and 278 of 411 values differed, test accuracy by up to 0.006 and Z~ accuracy by up to 0.025
(``experiments/drift.py``; the measured maxima are in ``experiments/results/drift/summary.json``, and a test checks
that :data:`DRIFT` covers them). Differences beyond it point at something else: another jaxforget, jax or data
version, or a bug.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["DRIFT", "compare", "differences", "summary", "check_comparable"]

# Largest absolute difference per metric that floating-point drift alone explains: twice the largest difference
# measured (see the module docstring). The accuracies move in whole samples (1000 test, 200 in Z~), the relative update
# norm most for hessian-smallest-nonzero (its near-zero curvatures amplify the last bits), and accuracy_restored is a
# ratio with a small denominator.
DRIFT = {
    "test_accuracy": 0.012,
    "attack_success": 0.016,
    "group_accuracy": 0.05,
    "fidelity_test": 0.012,
    "fidelity_group": 0.05,
    "mia_auc": 0.03,
    "top_k_recall": 0.03,
    "fraction": 0.0,
    "update_norm_relative": 0.85,
    "relearn_steps": 2,
    "accuracy_restored": 0.42,
}
# Settings that do not change the numbers: where the data lives, and whether tfds may download it.
_IGNORED_SETTINGS = ("data_dir", "download", "devices")  # where the data and the compute come from


def check_comparable(reference: dict[str, Any], config, seeds: list[int]) -> None:
    """Raises ``ValueError`` unless ``reference`` (a results.json) was written with the settings of ``config`` and
    the seeds ``seeds``: only then can its numbers be compared."""
    stored = dict(reference.get("config", {}))
    wanted = {**dataclasses.asdict(config), "seeds": list(seeds)}
    wanted.pop("seed")
    stored.pop("seed", None)
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    differ = sorted(  # a setting the reference predates counts as its default
        name
        for name in wanted
        if name not in _IGNORED_SETTINGS and _normal(stored.get(name, defaults.get(name))) != _normal(wanted[name])
    )
    if differ:
        shown = ", ".join(f"--{name.replace('_', '-')} {stored.get(name)!r}" for name in differ[:4])
        raise ValueError(
            f"--check-reproduction: the reference was run with other settings ({shown}); rerun with its command: "
            f"{reference.get('command', '(not recorded)')}"
        )


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def _values(row: dict[str, Any], cap: int) -> dict[str, float]:
    """The compared values of a row: its metrics, the update norm relative to the reference's (below), and the
    relearning steps with a capped run counted as ``cap + 1``."""
    values = {name: row.get(name) for name in DRIFT if name in row}
    if "relearn_steps" in row:
        values["relearn_steps"] = cap + 1 if row["relearn_steps"] is None else row["relearn_steps"]
    return {name: value for name, value in values.items() if isinstance(value, int | float)}


def differences(results: dict[str, Any], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """Every compared value of ``results`` beside the same value of ``reference`` (two results.json records):
    ``[{"seed", "method", "metric", "value", "reference", "difference"}]``, with ``metric == "row"`` and no values
    for a method the reference lacks."""
    cap = results.get("config", {}).get("relearn_steps", 0)
    seeds = results.get("config", {}).get("seeds", [])
    found = []
    for index, (rows, reference_rows) in enumerate(zip(results["per_seed"], reference["per_seed"], strict=True)):
        seed = seeds[index] if index < len(seeds) else index
        by_method = {row["method"]: row for row in reference_rows}
        for row in rows:
            other = by_method.get(row["method"])
            if other is None:
                found.append({"seed": seed, "method": row["method"], "metric": "row"})
                continue
            mine, theirs = _values(row, cap), _values(other, cap)
            norm, other_norm = row.get("update_norm"), other.get("update_norm")
            if isinstance(norm, int | float) and isinstance(other_norm, int | float) and other_norm > 0:
                mine["update_norm_relative"], theirs["update_norm_relative"] = norm / other_norm, 1.0
            for metric in sorted(set(mine) & set(theirs)):
                entry = {"seed": seed, "method": row["method"], "metric": metric}
                entry.update(value=mine[metric], reference=theirs[metric])
                found.append({**entry, "difference": abs(mine[metric] - theirs[metric])})
    return found


def compare(results: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Every per-seed value of ``results`` against the same value of ``reference``, classified as equal, within
    :data:`DRIFT` or beyond it.

    Returns:
      ``{"compared", "equal", "within_drift", "beyond_drift": [entries of :func:`differences` with "drift"],
      "machines": (this, reference), "versions": (this, reference)}``.
    """
    counts = {"compared": 0, "equal": 0, "within_drift": 0}
    beyond = []
    for entry in differences(results, reference):
        if entry["metric"] == "row":
            beyond.append({**entry, "drift": "missing"})
            continue
        counts["compared"] += 1
        if entry["difference"] == 0:
            counts["equal"] += 1
        elif entry["difference"] <= DRIFT[entry["metric"]]:
            counts["within_drift"] += 1
        else:
            beyond.append({**entry, "drift": DRIFT[entry["metric"]]})
    return {
        **counts,
        "beyond_drift": beyond,
        "machines": (results.get("machine"), reference.get("machine")),
        "versions": (results.get("versions"), reference.get("versions")),
    }


def summary(comparison: dict[str, Any], reference_path: str, shown: int = 10) -> str:
    """A few lines for the terminal: the counts, the differences beyond drift, and the versions that differ."""
    beyond = comparison["beyond_drift"]
    lines = [
        f"reproduction against {reference_path}: {comparison['compared']} values compared, {comparison['equal']} "
        f"equal, {comparison['within_drift']} within floating-point drift, {len(beyond)} beyond it"
    ]
    for entry in beyond[:shown]:
        if entry["metric"] == "row":
            lines.append(f"  seed {entry['seed']} {entry['method']}: not in the reference")
        else:
            lines.append(
                f"  seed {entry['seed']} {entry['method']} {entry['metric']}: {entry['value']:.4g} vs "
                f"{entry['reference']:.4g} (drift allows {entry['drift']:g})"
            )
    if len(beyond) > shown:
        lines.append(f"  ... and {len(beyond) - shown} more")
    mine, theirs = comparison["versions"]
    theirs = theirs or {}
    differing = sorted(name for name in (mine or {}) if theirs.get(name) not in (None, mine[name]))
    if differing:
        lines.append(
            "versions that differ from the reference's: "
            + ", ".join(f"{name} {mine[name]} (reference {theirs[name]})" for name in differing)
        )
    return "\n".join(lines)
