"""report: aggregation over seeds, the censored relearning median, paired comparisons and the written results."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from jaxforget import report

CAP = 20


def method_row(selection, update, **scores):
    """A row as the evaluate stage writes it; a baseline when ``update`` is None."""
    if update is None:
        return {"method": selection, "selection": None, "update": None, **scores}
    return {"method": f"{selection}/{update}", "selection": selection, "update": update, **scores}


def seeds_of(methods, key, values_by_method):
    """One list of rows per seed: ``methods`` are (selection, update) pairs, ``values_by_method`` their ``key``
    values per seed (a missing method gets 0.5 on every seed)."""
    count = len(next(iter(values_by_method.values())))
    return [
        [
            method_row(selection, update, **{key: values_by_method.get((selection, update), [0.5] * count)[s]})
            for selection, update in methods
        ]
        for s in range(count)
    ]


def single_score_runs(key, values):
    """Runs of one method ("hessian-largest/first-order") with ``values`` for ``key`` over the seeds."""
    return [[method_row("hessian-largest", "first-order", **{key: v})] for v in values]


def cell_of(table, method, header="relearn (median)"):
    """The cell of ``method`` under ``header`` in a Markdown table."""
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    column = lines[0].index(header)
    return next(cells[column] for cells in lines[2:] if cells[0] == method)


# aggregate


def test_aggregate_mean_and_student_t_half_width():
    values = [0.8, 0.9, 0.86]
    (row,) = report.aggregate(single_score_runs("test_accuracy", values), relearn_cap=CAP)
    expected = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert row["seeds"] == 3
    assert row["test_accuracy"] == pytest.approx(np.mean(values), abs=1e-15)
    assert row["test_accuracy_ci"] == pytest.approx(expected, rel=1e-12)
    assert row["attack_success"] is None and row["attack_success_ci"] is None  # absent on every seed


def test_aggregate_one_seed_and_equal_values_have_zero_half_width():
    (one,) = report.aggregate(single_score_runs("test_accuracy", [0.7]), relearn_cap=CAP)
    (equal,) = report.aggregate(single_score_runs("test_accuracy", [0.7, 0.7, 0.7]), relearn_cap=CAP)
    assert (one["test_accuracy"], one["test_accuracy_ci"]) == (0.7, 0.0)
    assert equal["test_accuracy"] == pytest.approx(0.7) and equal["test_accuracy_ci"] == 0.0


def test_aggregate_skips_missing_scores():
    (row,) = report.aggregate(single_score_runs("mia_auc", [0.5, None, 0.7, math.nan]), relearn_cap=CAP)
    assert row["mia_auc"] == pytest.approx(0.6)
    assert row["mia_auc_ci"] == pytest.approx(stats.t.ppf(0.975, 1) * np.std([0.5, 0.7], ddof=1) / math.sqrt(2))


@pytest.mark.parametrize(
    "runs, match",
    [
        ([], "runs: is empty"),
        ([[method_row("poisoned", None)], [method_row("retrained", None)]], r"runs\[1\] has methods"),
        ([[method_row("poisoned", None)], []], r"runs\[1\] has methods"),
    ],
)
def test_aggregate_rejects_mismatched_runs(runs, match):
    with pytest.raises(ValueError, match=match):
        report.aggregate(runs, relearn_cap=CAP)


# the censored relearning count


def test_relearn_median_with_a_minority_capped():
    (row,) = report.aggregate(single_score_runs("relearn_steps", [5, None, 7]), relearn_cap=CAP)
    assert row["relearn_steps"] == 7 and row["relearn_steps_censored"] is False
    assert row["relearn_steps_ci"] is None
    assert row["relearn_capped"] == 1 and row["relearn_capped_share"] == pytest.approx(1 / 3)
    assert cell_of(report.markdown_table([row], relearn_cap=CAP), row["method"]) == "7 (33% capped)"
    assert "7 (33% capped)" in report.format_table([row], relearn_cap=CAP)


def test_relearn_median_censored_when_most_seeds_capped():
    (row,) = report.aggregate(single_score_runs("relearn_steps", [None, None, 4]), relearn_cap=CAP)
    assert row["relearn_steps"] is None and row["relearn_steps_censored"] is True
    assert row["relearn_capped"] == 2 and row["relearn_capped_share"] == pytest.approx(2 / 3)
    assert cell_of(report.markdown_table([row], relearn_cap=CAP), row["method"]) == ">20 (67% capped)"
    assert ">20 (67% capped)" in report.format_table([row], relearn_cap=CAP)


@pytest.mark.parametrize(
    "values, cell",
    [
        ([3, 6], "4.5"),  # no seed capped: the plain median, no share
        ([3, None], ">20 (50% capped)"),  # half the seeds capped: the median lies above the cap
        ([None], ">20 (100% capped)"),
        ([0, 0, 0], "0"),
    ],
)
def test_relearn_cells(values, cell):
    rows = report.aggregate(single_score_runs("relearn_steps", values), relearn_cap=CAP)
    assert cell_of(report.markdown_table(rows, relearn_cap=CAP), rows[0]["method"]) == cell


def test_relearn_count_above_the_cap_is_rejected():
    with pytest.raises(ValueError, match="relearn_cap: 20 is below the observed relearning counts"):
        report.aggregate(single_score_runs("relearn_steps", [5, 21]), relearn_cap=CAP)


# paired comparisons

METHODS = [
    ("poisoned", None),
    ("hessian-largest", "first-order"),
    ("random", "first-order"),
    ("all", "first-order"),
    ("hessian-largest", "cg"),
    ("all", "cg"),
]
REFERENCE_ACCURACY = [0.6, 0.7, 0.8, 0.9, 0.75]


def only(comparisons, **match):
    (found,) = [c for c in comparisons if all(c[k] == v for k, v in match.items())]
    return found


def constant_win():
    """Runs where hessian-largest beats random by exactly 0.1 on every seed, and their comparisons."""
    other = [v - 0.1 for v in REFERENCE_ACCURACY]
    runs = seeds_of(
        METHODS,
        "group_accuracy",
        {("hessian-largest", "first-order"): REFERENCE_ACCURACY, ("random", "first-order"): other},
    )
    comparisons = report.paired_comparisons(runs, metrics=("group_accuracy",), relearn_cap=CAP)
    return other, comparisons


def test_paired_constant_win_collapses_the_interval():
    other, comparisons = constant_win()
    c = only(comparisons, update="first-order", other="random")
    differences = np.subtract(REFERENCE_ACCURACY, other)
    assert (c["reference"], c["metric"], c["n"]) == ("hessian-largest", "group_accuracy", 5)
    assert c["mean_difference"] == pytest.approx(0.1, abs=1e-12)
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(0.1, abs=1e-12), pytest.approx(0.1, abs=1e-12))
    assert (c["t_ci_low"], c["t_ci_high"]) == (pytest.approx(0.1, abs=1e-12), pytest.approx(0.1, abs=1e-12))
    assert (c["wins"], c["ties"], c["losses"]) == (5, 0, 0)
    assert c["better"] == "reference"
    assert c["wilcoxon_p"] == pytest.approx(stats.wilcoxon(differences, zero_method="zsplit").pvalue, rel=1e-12)
    assert c["wilcoxon_p"] == pytest.approx(2 / 2**5)  # exact: all five signs positive, two-sided


def test_paired_symmetric_differences_favour_neither():
    reference = [0.5] * 6
    other = [0.4, 0.6, 0.4, 0.6, 0.4, 0.6]
    runs = seeds_of(
        METHODS, "test_accuracy", {("hessian-largest", "first-order"): reference, ("all", "first-order"): other}
    )
    c = only(
        report.paired_comparisons(runs, metrics=("test_accuracy",), relearn_cap=CAP), other="all", update="first-order"
    )
    assert c["mean_difference"] == pytest.approx(0.0, abs=1e-12)
    assert c["ci_low"] < 0 < c["ci_high"] and c["t_ci_low"] < 0 < c["t_ci_high"]
    assert (c["wins"], c["ties"], c["losses"]) == (3, 0, 3)
    assert c["better"] == "neither"
    assert c["wilcoxon_p"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "metric, shift, better",
    [
        ("mia_auc", -0.05, "reference"),  # lower AUC on the reference: closer to chance, so the reference wins
        ("mia_auc", +0.05, "other"),
        ("attack_success", -0.05, "reference"),
        ("group_accuracy", -0.05, "other"),
        ("fidelity_group", +0.05, "reference"),
        ("exposure", -0.05, "reference"),  # less of the secret left
        ("bits_per_char", +0.05, "other"),  # worse language model
    ],
)
def test_paired_orientation(metric, shift, better):
    other = [0.55, 0.6, 0.65, 0.7, 0.58]
    runs = seeds_of(
        METHODS,
        metric,
        {("hessian-largest", "cg"): [v + shift for v in other], ("all", "cg"): other},
    )
    c = only(report.paired_comparisons(runs, metrics=(metric,), relearn_cap=CAP), update="cg", other="all")
    assert math.copysign(1, c["mean_difference"]) == math.copysign(1, shift)
    assert c["better"] == better


def test_paired_relearn_counts_a_capped_run_as_cap_plus_one():
    runs = [
        [method_row("hessian-largest", "finetune", relearn_steps=r), method_row("random", "finetune", relearn_steps=o)]
        for r, o in [(None, 5), (None, 6), (None, None), (10, 10)]
    ]
    c = only(report.paired_comparisons(runs, metrics=("relearn_steps",), relearn_cap=CAP), metric="relearn_steps")
    assert c["n"] == 4  # no seed dropped for censoring
    assert c["mean_difference"] == pytest.approx((21 - 5 + 21 - 6 + 0 + 0) / 4)
    assert (c["wins"], c["ties"], c["losses"]) == (2, 2, 0)
    with pytest.raises(ValueError, match="relearn_cap: 9 is below"):
        report.paired_comparisons(runs, metrics=("relearn_steps",), relearn_cap=9)


def test_paired_skips_seeds_with_a_missing_score():
    runs = seeds_of(
        METHODS,
        "group_accuracy",
        {
            ("hessian-largest", "first-order"): [0.6, None, 0.8, 0.9],
            ("random", "first-order"): [0.5, 0.5, math.nan, 0.7],
        },
    )
    c = only(report.paired_comparisons(runs, metrics=("group_accuracy",), relearn_cap=CAP), other="random")
    assert c["n"] == 2
    assert c["mean_difference"] == pytest.approx(0.15)


def test_paired_skips_selections_without_a_row_for_the_update():
    runs = seeds_of(METHODS, "test_accuracy", {("hessian-largest", "first-order"): [0.5, 0.6]})
    comparisons = report.paired_comparisons(runs, metrics=("test_accuracy", "mia_auc"), relearn_cap=CAP)
    assert [(c["update"], c["other"], c["metric"]) for c in comparisons] == [
        ("first-order", "random", "test_accuracy"),
        ("first-order", "random", "mia_auc"),
        ("first-order", "all", "test_accuracy"),
        ("first-order", "all", "mia_auc"),
        ("cg", "all", "test_accuracy"),
        ("cg", "all", "mia_auc"),
    ]


def test_paired_bootstrap_is_a_seeded_percentile_interval():
    reference = [0.61, 0.74, 0.8, 0.93, 0.7]
    other = [0.6, 0.7, 0.82, 0.85, 0.66]
    runs = seeds_of(METHODS, "test_accuracy", {("hessian-largest", "cg"): reference, ("all", "cg"): other})
    arguments = dict(metrics=("test_accuracy",), relearn_cap=CAP, resamples=500)
    first = report.paired_comparisons(runs, seed=3, **arguments)
    assert report.paired_comparisons(runs, seed=3, **arguments) == first
    c = only(first, update="cg")
    differences = np.subtract(reference, other)
    picks = np.random.default_rng(3).integers(0, 5, size=(500, 5))
    low, high = np.quantile(differences[picks].mean(axis=1), [0.025, 0.975])
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(low, abs=1e-15), pytest.approx(high, abs=1e-15))
    other_seed = only(report.paired_comparisons(runs, seed=4, **arguments), update="cg")
    assert (other_seed["ci_low"], other_seed["ci_high"]) != (c["ci_low"], c["ci_high"])


def test_paired_t_interval_matches_student_t():
    differences = np.array([0.01, 0.04, -0.02, 0.05, 0.03])
    runs = [
        [method_row("hessian-largest", "cg", mia_auc=0.5 + d), method_row("all", "cg", mia_auc=0.5)]
        for d in differences
    ]
    c = only(report.paired_comparisons(runs, metrics=("mia_auc",), relearn_cap=CAP, confidence=0.9), update="cg")
    half = stats.t.ppf(0.95, 4) * differences.std(ddof=1) / math.sqrt(5)
    assert c["confidence"] == 0.9
    assert c["t_ci_low"] == pytest.approx(differences.mean() - half, abs=1e-12)
    assert c["t_ci_high"] == pytest.approx(differences.mean() + half, abs=1e-12)


def test_paired_degenerate_cases():
    one_seed = [[method_row("hessian-largest", "cg", test_accuracy=0.9), method_row("all", "cg", test_accuracy=0.5)]]
    c = only(report.paired_comparisons(one_seed, metrics=("test_accuracy",), relearn_cap=CAP), update="cg")
    assert (c["n"], c["mean_difference"], c["wins"]) == (1, pytest.approx(0.4), 1)
    assert (c["ci_low"], c["t_ci_low"], c["wilcoxon_p"], c["better"]) == (None, None, None, "neither")

    ties = [
        [method_row("hessian-largest", "cg", test_accuracy=v), method_row("all", "cg", test_accuracy=v)]
        for v in (0.4, 0.6)
    ]
    c = only(report.paired_comparisons(ties, metrics=("test_accuracy",), relearn_cap=CAP), update="cg")
    assert (c["ties"], c["wilcoxon_p"], c["better"]) == (2, 1.0, "neither")
    assert (c["ci_low"], c["ci_high"]) == (0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reference": "gnb-largest"}, r"reference: 'gnb-largest' is no selection in the rows; pass one of \["),
        ({"metrics": ("seconds",)}, "metrics: .*'seconds'.* no known better direction"),
        ({"metrics": "mia_auc"}, "metrics: 'mia_auc' is a string"),
        ({"confidence": 1.5}, "confidence: 1.5 must lie strictly between 0 and 1"),
        ({"resamples": 0}, "resamples: 0 must be a positive int"),
    ],
)
def test_paired_rejects_bad_arguments(kwargs, match):
    runs = seeds_of(METHODS, "test_accuracy", {("hessian-largest", "cg"): [0.5, 0.6]})
    with pytest.raises(ValueError, match=match):
        report.paired_comparisons(runs, relearn_cap=CAP, **kwargs)


def test_paired_rejects_runs_with_different_methods():
    runs = seeds_of(METHODS, "test_accuracy", {("hessian-largest", "cg"): [0.5, 0.6]})
    runs[1] = runs[1][::-1]
    with pytest.raises(ValueError, match=r"runs\[1\] has methods"):
        report.paired_comparisons(runs, relearn_cap=CAP)


def test_paired_markdown_cells():
    _, comparisons = constant_win()
    table = report.paired_markdown(comparisons)
    lines = table.splitlines()
    assert lines[0] == "| update | vs | metric | n | mean diff [95% CI] | wins/ties/losses | Wilcoxon p | better |"
    assert len(lines) == 2 + len(comparisons)
    assert (
        "| first-order | random | group_accuracy | 5 | +0.100 [+0.100, +0.100] | 5/0/0 | 0.0625 | reference |" in lines
    )
    assert report.paired_markdown([]).splitlines()[2:] == []


# written results


def test_write_results_with_and_without_comparisons(tmp_path):
    runs = seeds_of(
        METHODS,
        "group_accuracy",
        {("hessian-largest", "first-order"): REFERENCE_ACCURACY, ("random", "first-order"): [0.5] * 5},
    )
    rows = report.aggregate(runs, relearn_cap=CAP)
    comparisons = report.paired_comparisons(runs, metrics=("group_accuracy", "relearn_steps"), relearn_cap=CAP)
    paths = report.write_results(
        tmp_path / "a", {"config": {"seed": 0}}, rows, relearn_cap=CAP, title="t", comparisons=comparisons
    )
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    record = json.loads(paths[0].read_text())
    assert record["config"] == {"seed": 0} and len(record["rows"]) == len(rows)
    assert record["paired"] == json.loads(json.dumps(comparisons))
    markdown = paths[1].read_text()
    assert "\n## Paired differences (reference minus other, by seed)\n" in markdown
    assert report.paired_markdown(comparisons) in markdown
    assert (
        markdown.index("# t")
        < markdown.index(report.markdown_table(rows, relearn_cap=CAP))
        < markdown.index("## Paired")
    )

    plain = report.write_results(tmp_path / "b", {}, rows, relearn_cap=CAP, title="t")
    assert "paired" not in json.loads(plain[0].read_text())
    assert "## Paired" not in plain[1].read_text()


def test_a_solver_that_did_not_converge_on_some_seed_is_marked_in_the_tables():
    runs = [
        [method_row("all", "cg", group_accuracy=0.9, converged=True), method_row("all", "first-order")],
        [method_row("all", "cg", group_accuracy=0.8, converged=False), method_row("all", "first-order")],
    ]
    rows = report.aggregate(runs, relearn_cap=20)
    assert rows[0]["converged"] is False and rows[1]["converged"] is None
    table = report.markdown_table(rows, relearn_cap=20)
    assert "| all/cg (not converged) |" in table and "| all/first-order |" in table
    assert report.aggregate(runs[:1], relearn_cap=20)[0]["converged"] is True
