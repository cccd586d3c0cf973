"""Records keep per-item scores and carry the intervals they give; old records without items still read."""

import json

import numpy as np
import pytest

from atv.experiments.cells import cell_record, paired_items, record_intervals, record_items
from evaluation.intervals import Bootstrap, retention_intervals
from evaluation.reports import BenchmarkResult, EvalReport, ItemResult


def _report(per_bench: dict[str, list[float]]) -> EvalReport:
    results = []
    for name, scores in per_bench.items():
        items = [ItemResult(f"{name}-{i}", None, s) for i, s in enumerate(scores)]
        results.append(BenchmarkResult(name, "choice", len(items), 100 * sum(scores) / len(scores), items=items))
    return EvalReport(results)


DENSE = {"look": [1, 1, 0, 1, 1, 0, 1, 1], "fid": [1.0, 1.0, 1.0]}
CELL = {"look": [1, 0, 0, 1, 0, 0, 1, 1], "fid": [0.75, 0.5, 1 / 3]}


def test_records_keep_compact_items_and_intervals():
    dense = cell_record({"pathway": "dense"}, _report(DENSE), None, None)
    cell = cell_record({"pathway": "text"}, _report(CELL), None, dense)
    assert cell["items"]["look"]["scores"] == [1, 0, 0, 1, 0, 0, 1, 1]
    assert cell["items"]["fid"]["scores"] == [0.75, 0.5, 0.333333]  # six decimals, 0/1 as integers
    assert json.dumps(cell["items"]["look"]).count(".") == 0
    assert record_items(cell)["fid"] == [0.75, 0.5, 0.333333]
    intervals = cell["intervals"]
    assert (intervals["level"], intervals["resamples"], intervals["seed"]) == (0.95, 2000, 0)
    # the dense model against itself: 100% on every resample
    assert dense["intervals"]["retention"] == {"look": [100.0, 100.0], "fid": [100.0, 100.0]}
    assert dense["intervals"]["mean_retention"] == [100.0, 100.0]
    assert dense["intervals"]["scores"]["fid"] == [100.0, 100.0]
    # fid's dense items are all 1: its retention resamples are its score resamples
    assert intervals["retention"]["fid"] == pytest.approx(intervals["scores"]["fid"])
    for name in ("look", "fid"):
        low, high = intervals["scores"][name]
        assert low <= cell["scores"][name] <= high and low < high
    low, high = intervals["mean_retention"]
    assert low < cell["mean_retention"] < high
    expected = retention_intervals({n: CELL[n] for n in ("look", "fid")}, DENSE)
    assert intervals["mean_retention"][0] == pytest.approx(expected.mean.low, abs=1e-4)


def test_intervals_follow_the_seed_and_recompute_from_the_log():
    dense = cell_record({"pathway": "dense"}, _report(DENSE), None, None)
    seeded = cell_record({"pathway": "text"}, _report(CELL), None, dense, boot=Bootstrap(seed=5))
    again = record_intervals(json.loads(json.dumps(seeded)), dense, Bootstrap(seed=5))
    assert again == seeded["intervals"] and again["seed"] == 5
    assert record_intervals(seeded, dense)["mean_retention"] != seeded["intervals"]["mean_retention"]  # seed 0


def test_old_records_without_items_read_and_give_no_interval():
    old_dense = cell_record({"pathway": "dense"}, {"look": 75.0, "fid": 100.0}, None, None)
    assert "items" not in old_dense and "intervals" not in old_dense and record_items(old_dense) == {}
    new = cell_record({"pathway": "text"}, _report(CELL), None, old_dense)
    assert new["retention"]["look"] == pytest.approx(100 * 50 / 75)
    assert set(new["intervals"]["scores"]) == {"look", "fid"}
    assert "retention" not in new["intervals"] and "mean_retention" not in new["intervals"]


def test_retention_intervals_need_the_same_items_on_both_sides():
    dense = cell_record({"pathway": "dense"}, _report(DENSE), None, None)
    other = json.loads(json.dumps(dense))
    other["items"]["look"]["ids"] = "0" * 16  # another item order
    cell = cell_record({"pathway": "text"}, _report(CELL), None, other)
    assert paired_items(cell, other) == ["fid"]
    assert set(cell["intervals"]["retention"]) == {"fid"} and "mean_retention" not in cell["intervals"]


def test_a_benchmark_without_items_leaves_the_mean_without_interval():
    report = _report(CELL)
    report.results[1].items = None  # e.g. an lmms-eval task scored through the bridge
    dense = cell_record({"pathway": "dense"}, _report(DENSE), None, None)
    cell = cell_record({"pathway": "text"}, report, None, dense)
    assert list(cell["items"]) == ["look"] and set(cell["intervals"]["retention"]) == {"look"}
    assert "mean_retention" not in cell["intervals"]
    low, high = cell["intervals"]["retention"]["look"]
    assert np.isfinite([low, high]).all() and low < cell["retention"]["look"] < high
