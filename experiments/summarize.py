"""Prints the README's compact tables from a results folder: means with intervals for chosen scores, and the paired
differences of Hessian-largest against every other rule on chosen metrics.

    python experiments/summarize.py experiments/results/label-flip-10-seeds
    python experiments/summarize.py experiments/results/backdoor-relabel --metrics attack_success,test_accuracy
    python experiments/summarize.py experiments/results/canary-10-seeds --scores exposure,attack_success,bits_per_char,\
mia_auc,gradient_equivalents --metrics exposure,bits_per_char,mia_auc
    python experiments/summarize.py experiments/results/forgetting-digits-mlp-k32 --scores forgetting_score,\
final_score,lira_auc,test_accuracy,family_seconds_per_model --metrics forgetting_score,lira_auc
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

SCORES = ("test_accuracy", "group_accuracy", "attack_success", "mia_auc", "relearn_steps", "gradient_equivalents")
NAMES = {
    "test_accuracy": "test acc",
    "group_accuracy": "Z~ acc",
    "attack_success": "attack",
    "mia_auc": "MIA AUC",
    "relearn_steps": "relearn",
    "gradient_equivalents": "grad-eq",
    "fidelity_group": "agree Z",
    "exposure": "exposure",
    "bits_per_char": "bits/char",
    "forgetting_score": "forget score",
    "final_score": "final",
    "lira_auc": "LiRA AUC",
    "forget_confidence": "Z conf",
    "family_seconds_per_model": "s/model",
}


def _mean(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "relearn_steps":
        share = row.get("relearn_capped_share") or 0.0
        text = f">{row.get('relearn_cap', '')}" if value is None else f"{value:g}"
        return text + (f" ({share:.0%} capped)" if share else "")
    if value is None:
        return "-"
    text = f"{value:.0f}" if key == "gradient_equivalents" else f"{value:.2f}" if key == "exposure" else f"{value:.3f}"
    half = row.get(f"{key}_ci")
    width = 2 if key == "exposure" else 3
    return text + (f" ±{half:.{width}f}" if half and key != "gradient_equivalents" else "")


def means_table(rows: list[dict], scores, relearn_cap: int) -> str:
    header = "| method | " + " | ".join(NAMES[s] for s in scores) + " |"
    lines = [header, "|---|" + "---:|" * len(scores)]
    for row in rows:
        row = {**row, "relearn_cap": relearn_cap}
        lines.append(f"| {row['method']} | " + " | ".join(_mean(row, s) for s in scores) + " |")
    return "\n".join(lines)


def paired_table(paired: list[dict], metrics) -> str:
    header = "| update | Hessian-largest vs | " + " | ".join(NAMES[m] for m in metrics) + " |"
    lines = [header, "|---|---|" + "---|" * len(metrics)]
    keyed = {(c["update"], c["other"], c["metric"]): c for c in paired}
    for update, other in dict.fromkeys((c["update"], c["other"]) for c in paired):
        cells = []
        for metric in metrics:
            c = keyed.get((update, other, metric))
            if c is None or c["n"] < 2:
                cells.append("-")
                continue
            p = "-" if c["wilcoxon_p"] is None else f"{c['wilcoxon_p']:.2g}"
            mark = {"reference": " ✓", "other": " ✗", "neither": ""}[c["better"]]
            cells.append(
                f"{c['mean_difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
                f"{c['wins']}/{c['ties']}/{c['losses']} p={p}{mark}"
            )
        lines.append(f"| {update} | {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--scores", default=",".join(SCORES))
    parser.add_argument("--metrics", default="group_accuracy,test_accuracy,mia_auc")
    parser.add_argument("--methods", default=None, help="comma-separated methods to list (default: all)")
    args = parser.parse_args(argv)
    record = json.loads((pathlib.Path(args.folder) / "results.json").read_text())
    rows = record["rows"]
    if args.methods:
        wanted = args.methods.split(",")
        rows = [row for row in rows if row["method"] in wanted]
    print(means_table(rows, args.scores.split(","), record["config"]["relearn_steps"]))
    if record.get("paired"):
        print()
        print(paired_table(record["paired"], args.metrics.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
