"""Intervals in tables and figures: written next to every value that has one, drawn as error bars."""

import matplotlib
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from analysis.sensitivity import error_bars, method_figure, sensitivity_figure
from analysis.tables import (
    difference_table,
    differences_summary,
    method_table,
    probe_table,
    scores_table,
    to_csv,
    to_latex,
    to_markdown,
)

matplotlib.use("Agg")


def _probe(pathway, pool, sparsity, mean, interval=None):
    record = {"cell": {"pathway": pathway, "pool": pool, "sparsity": sparsity}, "mean_retention": mean,
              "scores": {"a": mean / 2}, "retention": {"a": mean}}
    if interval is not None:
        record["intervals"] = {"level": 0.95, "scores": {"a": [interval[0] / 2, interval[1] / 2]},
                               "retention": {"a": interval}, "mean_retention": interval}
    return record


PROBE = [{"cell": {"pathway": "dense"}, "mean_retention": 100.0, "scores": {"a": 50.0}},
         _probe("text", "text", 0.5, 71.3, [64.04, 78.06]), _probe("text", "text", 0.6, 52.22),  # an old record
         _probe("visual", "text", 0.5, 91.0, [85.0, 96.5])]


def test_probe_table_shows_intervals_where_records_have_them():
    header, rows = probe_table(PROBE)
    assert rows == [["text", "text", "71.30 [64.0, 78.1]", "52.22"], ["visual", "text", "91.00 [85.0, 96.5]", "–"]]
    assert to_markdown((header, rows)).splitlines()[1] == "|---|---|---:|---:|"  # still right-aligned numbers
    latex = to_latex((header, rows))
    assert r"\begin{tabular}{llrr}" in latex and "71.30 {[}64.0, 78.1{]}" in latex
    assert to_csv((header, rows)).splitlines()[1] == 'text,text,"71.30 [64.0, 78.1]",52.22'


def test_scores_and_method_tables_show_intervals():
    header, rows = scores_table(PROBE[1:2])
    assert header == ["setting", "a", "mean retention"]
    assert rows == [["text / text / 0.5", "35.65 [32.0, 39.0]", "71.30 [64.0, 78.1]"]]
    methods = [{"cell": {"method": "atv", "setting": "50%"}, "mean_retention": 48.47,
                "intervals": {"mean_retention": [41.2, 55.0]}},
               {"cell": {"method": "wanda", "setting": "50%"}, "mean_retention": 40.78}]
    assert method_table(methods)[1] == [["atv", "48.47 [41.2, 55.0]"], ["wanda", "40.78"]]


def test_difference_tables_by_hand():
    diff = {"a": "text/text/0.5", "b": "text/visual/0.5",
            "rows": {"digit": {"a": 50.0, "a_ci": [30.0, 70.0], "b": 40.0, "b_ci": [20.0, 60.0], "diff": 10.0,
                               "diff_ci": [-5.0, 25.0]},
                     "mean retention": {"a": 54.19, "a_ci": [50.0, 58.3], "b": 46.52, "b_ci": [42.1, 50.9],
                                        "diff": 7.67, "diff_ci": [2.04, 13.0]},
                     "old": {"a": 1.0, "b": 2.0, "diff": -1.0}}}
    header, rows = difference_table(diff)
    assert header == ["", "text/text/0.5", "text/visual/0.5", "text/text/0.5 − text/visual/0.5", "separates"]
    assert rows == [["digit", "50.00 [30.0, 70.0]", "40.00 [20.0, 60.0]", "10.00 [-5.0, 25.0]", "no"],
                    ["mean retention", "54.19 [50.0, 58.3]", "46.52 [42.1, 50.9]", "7.67 [2.0, 13.0]", "yes"],
                    ["old", "1.00", "2.00", "-1.00", "–"]]
    assert to_markdown((header, rows)).splitlines()[1] == "|---|---:|---:|---:|---|"
    assert r"text/text/0.5 $-$ text/visual/0.5" in to_latex((header, rows))
    header, rows = differences_summary([diff, {**diff, "rows": {}}])
    assert header == ["A", "B", "A: mean retention", "B: mean retention", "A − B", "separates"]
    assert rows == [["text/text/0.5", "text/visual/0.5", "54.19 [50.0, 58.3]", "46.52 [42.1, 50.9]",
                     "7.67 [2.0, 13.0]", "yes"]]
    header, rows = differences_summary([{**diff, "finding": "A"}, diff], row="digit")
    assert header[:2] == ["finding", "A"] and [r[0] for r in rows] == ["A", ""] and rows[0][-2:] == [
        "10.00 [-5.0, 25.0]", "no"]


def test_error_bars_measure_down_and_up_from_the_value():
    bars = error_bars([70.0, 50.0, 80.0], [(60.0, 75.0), None, (81.0, 90.0)])
    assert np.array_equal(bars[:, 0], [10.0, 5.0]) and np.isnan(bars[:, 1]).all()
    assert np.array_equal(bars[:, 2], [0.0, 10.0])  # a bound past the value draws no negative bar
    assert error_bars([1.0], [None]) is None


def _segments(container: ErrorbarContainer) -> list[tuple[float, float]]:
    """(low, high) of every drawn bar (a point without an interval draws an empty segment)."""
    return [(float(seg[0][1]), float(seg[1][1])) for seg in container.lines[2][0].get_segments() if len(seg)]


def test_sensitivity_figure_draws_the_intervals():
    import matplotlib.pyplot as plt

    data, fig = sensitivity_figure(PROBE)
    ax = fig.axes[0]
    containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(containers) == 2  # text/text (one of its two points has an interval) and visual/text
    drawn = sorted(s for c in containers for s in _segments(c))
    assert drawn == [pytest.approx((64.04, 78.06)), pytest.approx((85.0, 96.5))]
    assert data.intervals[("text", "text")] == [(64.04, 78.06), None]
    plt.close(fig)
    old = [{k: v for k, v in r.items() if k != "intervals"} for r in PROBE]
    _, fig = sensitivity_figure(old)
    assert not any(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)
    plt.close(fig)


def test_method_figure_draws_error_bars_on_the_bars():
    import matplotlib.pyplot as plt

    dense = {"cell": {"method": "dense", "setting": "dense"}, "scores": {"a": 80.0}, "retention": {"a": 100.0},
             "mean_retention": 100.0, "intervals": {"scores": {"a": [62.0, 95.0]}}}
    atv = {"cell": {"method": "atv", "setting": "50%"}, "scores": {"a": 40.0}, "retention": {"a": 50.0},
           "mean_retention": 50.0, "intervals": {"scores": {"a": [20.0, 60.0]}, "retention": {"a": [26.0, 74.0]},
                                                  "mean_retention": [26.0, 74.0]}}
    data, fig = method_figure([dense, atv], "retention")
    assert data.intervals["50%"]["atv"] == {"a": (26.0, 74.0), "mean": (26.0, 74.0)}
    (container,) = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert _segments(container) == [(26.0, 74.0), (26.0, 74.0)]
    plt.close(fig)
    data, fig = method_figure([dense, atv], "scores")
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert sorted(s for c in bars for s in _segments(c)) == [(20.0, 60.0), (62.0, 95.0)]  # atv's and dense's
    plt.close(fig)
