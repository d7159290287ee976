"""Where do the selection rules separate? The main job over a range of budgets or group sizes, one plot each.

Each value runs ``jaxforget run`` with the tuned defaults (tuned at a budget of 1% and a group of 200; the sweep does
not re-tune) over the given seeds, writes that run's results folder under ``--out/<value>``, and then one
``summary.json`` and ``sweep.png`` with the mean and 95% interval of each rule's scores against the swept value.

    python experiments/sweep.py budget --values 0.0005,0.001,0.003,0.01,0.1 --seeds 0,1,2   # ~15 min, 2 CPU cores
    python experiments/sweep.py group-size --values 200,500,1000 --seeds 0,1,2                # ~15 min, 2 CPU cores

Every value shares ``--workdir`` (its outputs are keyed by their settings): budgets reuse the trained models and the
curvature found there, each group size trains its own models, and pointing ``--workdir`` at the main study's reuses
its group of 200.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jaxforget import cli
from jaxforget.atomic import open_atomic, write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]
PANELS = (("group_accuracy", "accuracy on Z~"), ("test_accuracy", "test accuracy"), ("mia_auc", "MIA AUC on Z"))
CANARY_PANELS = (
    ("exposure", "exposure of the secret, bits"),
    ("bits_per_char", "test bits per character"),
    ("mia_auc", "MIA AUC on Z"),
)


def _plot(summary: dict, path: pathlib.Path) -> None:
    """One row of panels per update, one line per selection rule (the same color in every panel), the poisoned and
    the retrained model as black lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = summary["values"]
    baselines = summary["baselines"]
    canary = any(point.get("exposure") is not None for point in baselines.get("poisoned", []))
    panels = CANARY_PANELS if canary else PANELS
    updates = list(dict.fromkeys(method.split("/")[1] for method in summary["methods"]))
    selections = list(dict.fromkeys(method.split("/")[0] for method in summary["methods"]))
    colors = plt.get_cmap("tab20")
    figure, axes = plt.subplots(
        len(updates), len(panels), figsize=(6 * len(panels), 3.6 * len(updates) + 1.2), squeeze=False
    )
    for row, update in enumerate(updates):
        for ax, (key, label) in zip(axes[row], panels, strict=True):
            # Means only: the seeds differ more from each other than the rules do, so per-rule intervals overlap
            # everywhere; each value's results.md holds the intervals and the paired differences.
            for index, selection in enumerate(selections):
                series = summary["methods"].get(f"{selection}/{update}")
                if series:
                    means = [point[key] for point in series]
                    ax.plot(values, means, marker="o", color=colors(index % colors.N), label=selection)
            for name, style in (("poisoned", "--"), ("retrained", ":")):
                ax.plot(values, [point[key] for point in baselines[name]], "k" + style, label=name)
            if key == "bits_per_char":  # a few collapsed models would squash the rest: the axis stops at 1.5x
                ceiling = 1.5 * max(point[key] for point in baselines["poisoned"])
                ax.set_ylim(top=ceiling)
                ax.set_title(f"{update}: {label} (axis cut at {ceiling:.1f})", fontsize=9)
            else:
                ax.set_title(f"{update}: {label}", fontsize=9)
            ax.set_xscale("log" if summary["parameter"] == "budget" else "linear")
            ax.set_xlabel(summary["parameter"])
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=7, fontsize=8)
    figure.suptitle(summary["title"] + "; means over the seeds", fontsize=10)
    figure.tight_layout(rect=(0, 1.0 / (3.6 * len(updates) + 1.2), 1, 1))
    with open_atomic(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parameter", choices=("budget", "group-size"))
    parser.add_argument("--values", required=True, help="comma-separated values of the swept setting")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--updates", default="first-order")
    parser.add_argument("--workdir", default="runs/sweep")
    parser.add_argument("--out", default=None, help="default: experiments/results/sweep-<parameter>")
    parser.add_argument("--replot", action="store_true", help="only redraw sweep.png from an existing summary.json")
    args, extra = parser.parse_known_args(argv)
    values = [float(v) if args.parameter == "budget" else int(v) for v in args.values.split(",")]
    out = pathlib.Path(args.out or ROOT / "experiments" / "results" / f"sweep-{args.parameter}")
    if args.replot:
        _plot(json.loads((out / "summary.json").read_text()), out / "sweep.png")
        return 0
    summary = {"parameter": args.parameter, "values": values, "seeds": args.seeds, "methods": {}, "baselines": {}}
    for value in values:
        run_args = ["run", f"--{args.parameter}", str(value), "--seeds", args.seeds, "--updates", args.updates]
        run_args += ["--workdir", args.workdir, "--out", str(out / str(value)), "--quiet", *extra]
        print(f"sweep: {args.parameter} = {value}", flush=True)
        if cli.main(run_args) != 0:
            return 2
        rows = json.loads((out / str(value) / "results.json").read_text())["rows"]
        for row in rows:
            target = summary["baselines"] if row["update"] is None else summary["methods"]
            target.setdefault(row["method"], []).append(row)
    tuned = "hyperparameters tuned at the defaults"
    summary["title"] = f"sweep over {args.parameter} (seeds {args.seeds}, updates {args.updates}, {tuned})"
    summary["command"] = " ".join(["experiments/sweep.py", *(argv if argv is not None else sys.argv[1:])])
    write_json_atomic(out / "summary.json", summary)
    _plot(summary, out / "sweep.png")
    print(f"wrote {out / 'summary.json'} and {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
