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


# -- atv compare: two cells of a log, paired on their items -------------------------------------------------
def _log(tmp_path, with_items=True):
    from analysis.sensitivity import write_records

    make = _report if with_items else (lambda per: {n: 100 * sum(v) / len(v) for n, v in per.items()})
    dense = cell_record({"pathway": "dense"}, make(DENSE), None, None)
    text = cell_record({"pathway": "text", "pool": "text", "sparsity": 0.5}, make(CELL), None, dense)
    better = {"look": [1, 1, 0, 1, 0, 0, 1, 1], "fid": [0.75, 0.5, 0.5]}  # one more item right, one text closer
    visual = cell_record({"pathway": "visual", "pool": "text", "sparsity": 0.5}, make(better), None, dense)
    return write_records([dense, text, visual], tmp_path / "probe" / "results.jsonl").parent


def test_compare_cells_gives_paired_differences(tmp_path, capsys):
    from atv.cli import main
    from atv.experiments.compare import compare_cells, find_cell
    from atv.experiments.records import read_records
    from evaluation.intervals import paired_differences

    records = read_records(_log(tmp_path) / "results.jsonl")
    assert find_cell(records, "visual/text/0.50")["cell"]["pathway"] == "visual"
    diff = compare_cells(records, "visual/text/0.5", "text/text/0.5")
    assert list(diff["rows"]) == ["look", "fid", "mean retention"]
    assert diff["rows"]["look"]["diff"] == pytest.approx(12.5) and diff["rows"]["look"]["a"] == 62.5
    assert diff["rows"]["fid"]["diff"] == pytest.approx(100 * (0.5 - 0.333333) / 3, abs=1e-4)
    expected = paired_differences({"look": [1, 1, 0, 1, 0, 0, 1, 1]}, {"look": CELL["look"]}).scores["look"]
    assert diff["rows"]["look"]["diff_ci"] == expected.interval.to_list()
    assert diff["rows"]["look"]["diff_ci"][0] == 0.0  # B never beats A on an item: no resample goes below 0
    retention = diff["rows"]["mean retention"]
    assert retention["diff"] == pytest.approx(records[2]["mean_retention"] - records[1]["mean_retention"])
    assert retention["a_ci"] == records[2]["intervals"]["mean_retention"]
    same = compare_cells(records, "text/text/0.5", "text/text/0.5")
    assert all(row["diff_ci"] == [0.0, 0.0] for row in same["rows"].values())
    assert main(["compare", "--results", str(tmp_path / "probe"), "--a", "visual/text/0.5", "--b",
                 "text/text/0.5", "--resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "|  | visual/text/0.5 | text/text/0.5 | visual/text/0.5 − text/text/0.5 | separates |"
    assert "| look | 62.50 [" in out and "500 resamples" in out and "| mean retention |" in out


def test_compare_cells_refuses_what_it_cannot_pair(tmp_path, capsys):
    from atv.cli import main
    from atv.experiments.compare import compare_cells
    from atv.experiments.records import read_records
    from pruning.errors import ConfigError, ToolkitError

    records = read_records(_log(tmp_path) / "results.jsonl")
    with pytest.raises(ConfigError, match=r"no cell 'text/mixed/0.5'.*choose one of: dense, text/text/0.5"):
        compare_cells(records, "text/mixed/0.5", "dense")
    old = read_records(_log(tmp_path / "old", with_items=False) / "results.jsonl")
    with pytest.raises(ToolkitError, match="no per-item scores"):
        compare_cells(old, "text/text/0.5", "visual/text/0.5")
    assert main(["compare", "--results", str(tmp_path / "nothing"), "--a", "x", "--b", "y"]) == 2
    assert "no result log at" in capsys.readouterr().err
    assert main(["compare", "--results", str(tmp_path / "probe"), "--a", "dense", "--b", "dense",
                 "--level", "1.5"]) == 2
    assert "level must be in (0, 1)" in capsys.readouterr().err
