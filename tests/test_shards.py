"""`atv probe --cells PATTERN`, `--shard i/n` and `--merge`: which cells a run computes, shards one after the
other and at once (two processes) give the table of one run, and bad selections are refused before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_studies import study_files

from atv.cli import main
from atv.experiments.cells import CellSelection, cell_name, run_cells
from atv.experiments.probe_study import StudyConfig
from atv.experiments.records import RESULTS, ResultLog, Shard, read_records
from pruning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GRID = ["dense", "text/text/0.5", "text/visual/0.5", "text/mixed/0.5", "visual/text/0.5", "visual/visual/0.5",
        "visual/mixed/0.5"]


def _names(cells):
    return [cell_name(c) for c in cells]


def test_cell_names_patterns_and_shards_by_hand(tmp_path):
    cells = StudyConfig(sparsities=(0.5,)).cells()
    assert _names(cells) == GRID
    empty = ResultLog(tmp_path / "s", {})
    # on the whole log the dense cell joins any selection while it has no record
    assert _names(CellSelection(cells=("text/*/0.5",)).pick(cells, empty)) == ["dense", *GRID[1:4]]
    assert _names(CellSelection(cells=("*/visual/*", "dense")).pick(cells, empty)) == \
        ["dense", "text/visual/0.5", "visual/visual/0.5"]
    # shard i of n: positions p with p % n == i - 1 of the selected cells; no dense added
    assert _names(CellSelection(shard="1/2").pick(cells, empty)) == \
        ["dense", "text/visual/0.5", "visual/text/0.5", "visual/mixed/0.5"]
    assert _names(CellSelection(shard="2/2").pick(cells, empty)) == \
        ["text/text/0.5", "text/mixed/0.5", "visual/visual/0.5"]
    assert _names(CellSelection(cells=("visual/*",), shard="2/2").pick(cells, empty)) == ["visual/visual/0.5"]
    for n in (1, 3, 7, 9):
        shards = [_names(CellSelection(shard=f"{i}/{n}").pick(cells, empty)) for i in range(1, n + 1)]
        assert sorted(sum(shards, [])) == sorted(GRID)  # each cell in exactly one shard
    assert CellSelection(merge=True).pick(cells, empty) == []
    assert Shard.parse("2/4").file == "records.shard-2-of-4.jsonl"


@pytest.mark.parametrize("kwargs, match", [
    ({"shard": "3/2"}, r"1 <= I <= N, got 3/2"),
    ({"shard": "0/2"}, r"1 <= I <= N, got 0/2"),
    ({"shard": "two"}, r"I/N \(e.g. 2/4.*got 'two'"),
    ({"shard": "1/2/3"}, r"got '1/2/3'"),
    ({"merge": True, "shard": "1/2"}, "--merge computes nothing"),
    ({"merge": True, "cells": ("dense",)}, "--merge computes nothing"),
])
def test_bad_selection(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CellSelection(**kwargs)


def test_a_pattern_matching_no_cell_names_the_cells():
    with pytest.raises(ConfigError, match=r"--cells audio/\* matches no cell.*dense, text/text/0.5"):
        CellSelection(cells=("audio/*",)).matching(StudyConfig(sparsities=(0.5,)).cells())


class Backwards:
    """An executor that returns the measurements in reverse order (as Ray may: the dense cell last)."""

    remote = False

    def map(self, measure, cells, shared=None):
        return iter([measure(c, shared) for c in reversed(cells)])


def _measure(cell, shared):
    score = {"dense": 50.0, "a": 25.0, "b": 40.0}[cell["method"]]
    return {"cell": cell, "scores": {"bench": score}, "metrics": {"bench": {}}, "prune": None, "seconds": 1.0,
            "environment": {}}


def test_cells_measured_before_the_dense_cell_wait_for_it(tmp_path):
    cells = [{"method": "dense"}, {"method": "a"}, {"method": "b"}]
    seen = []
    log = ResultLog(tmp_path / "s", {"config": {}})
    assert run_cells(log, cells, _measure, desc="", progress=False, executor=Backwards(), on_cell=seen.append) == 3
    records = read_records(tmp_path / "s" / RESULTS)
    assert [r["cell"]["method"] for r in records] == ["dense", "b", "a"]  # dense first, then the held cells
    assert [r["mean_retention"] for r in records] == [100.0, 80.0, 50.0]  # 40/50, 25/50
    assert [list(r) for r in records][0] == ["cell", "scores", "metrics", "prune", "retention", "mean_retention",
                                             "seconds", "environment"]
    assert seen == records


def test_shard_measurements_become_records_on_the_whole_log(tmp_path):
    cells = [{"method": "dense"}, {"method": "a"}, {"method": "b"}]
    for i in (2, 1):  # the shard holding the dense cell finishes last
        shard = ResultLog(tmp_path / "s", {"config": {}}, Shard(i, 2))
        run_cells(shard, cells, _measure, desc="", progress=False, selection=CellSelection(shard=f"{i}/2"))
    assert not (tmp_path / "s" / RESULTS).exists()
    parts = {p.name: [r["cell"]["method"] for r in read_records(p)] for p in (tmp_path / "s").glob("records.*")}
    assert parts == {"records.shard-1-of-2.jsonl": ["dense", "b"], "records.shard-2-of-2.jsonl": ["a"]}
    assert "retention" not in read_records(tmp_path / "s" / "records.shard-2-of-2.jsonl")[0]
    whole = ResultLog(tmp_path / "s", {"config": {}})
    assert run_cells(whole, cells, _measure, desc="", progress=False, executor=Backwards(),
                     selection=CellSelection(merge=True)) == 0
    records = read_records(tmp_path / "s" / RESULTS)
    assert [(r["cell"]["method"], r["mean_retention"]) for r in records] == [("dense", 100.0), ("a", 50.0),
                                                                             ("b", 80.0)]


# -- from the command line, on a tiny model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made = study_files(tmp_path_factory.mktemp("shards"))
    return made.tmp, [*made.args(made.bench, made.fidelity), "--sparsities", "0.5", "--batch-size", "2"]


@pytest.fixture(scope="module")
def full(files):
    tmp, args = files
    assert main(["probe", *args, "--out", str(tmp / "full")]) == 0
    return tmp / "full"


def _scores(folder: Path) -> dict[str, dict]:
    return {cell_name(r["cell"]): (r["scores"], r["retention"]) for r in read_records(folder / RESULTS)}


def _same_as_full(folder: Path, full: Path) -> None:
    assert _scores(folder) == _scores(full)
    assert (folder / "probe_table.md").read_text() == (full / "probe_table.md").read_text()


def _shard_cells(folder: Path) -> list[list[str]]:
    return [[cell_name(r["cell"]) for r in read_records(folder / f"records.shard-{i}-of-2.jsonl")] for i in (1, 2)]


def test_shards_one_after_the_other_then_a_rerun_give_the_table_of_one_run(files, full, capsys):
    tmp, args = files
    out = tmp / "sequential"
    assert main(["probe", *args, "--out", str(out), "--shard", "1/2"]) == 0
    assert "4 cells computed in shard 1/2" in capsys.readouterr().out
    assert main(["probe", *args, "--out", str(out), "--shard", "2/2"]) == 0
    assert not (out / RESULTS).exists() and not (out / "probe_table.md").exists()
    first, second = _shard_cells(out)
    assert sorted(first + second) == sorted(GRID) and not set(first) & set(second)
    assert main(["probe", *args, "--out", str(out)]) == 0  # any rerun reads the shards' records
    assert "0 cells computed, 7 resumed" in capsys.readouterr().out
    _same_as_full(out, full)


def _cli(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "atv.cli", "probe", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_shards_at_once_then_merge_give_the_table_of_one_run(files, full, capsys):
    tmp, args = files
    out = tmp / "concurrent"
    shards = [_cli([*args, "--out", str(out), "--shard", f"{i}/2"]) for i in (1, 2)]
    for shard in shards:
        _, err = shard.communicate(timeout=300)
        assert shard.returncode == 0, err
    first, second = _shard_cells(out)
    assert sorted(first + second) == sorted(GRID) and not set(first) & set(second)
    assert main(["probe", *args, "--out", str(out), "--merge"]) == 0
    assert "0 cells computed, 7 resumed" in capsys.readouterr().out
    _same_as_full(out, full)


def test_cells_run_a_subset_and_a_rerun_completes_it(files, full, capsys):
    tmp, args = files
    out = tmp / "subset"
    assert main(["probe", *args, "--out", str(out), "--cells", "visual/*"]) == 0
    text = capsys.readouterr().out
    assert "4 cells computed" in text and "3 cells have no record yet: text/text/0.5 text/visual/0.5" in text
    assert sorted(_scores(out)) == sorted(["dense", "visual/text/0.5", "visual/visual/0.5", "visual/mixed/0.5"])
    assert main(["probe", *args, "--out", str(out)]) == 0
    assert "3 cells computed, 4 resumed" in capsys.readouterr().out
    _same_as_full(out, full)


@pytest.mark.parametrize("extra, message", [
    (["--cells", "audio/*"], "--cells audio/* matches no cell of this grid"),
    (["--shard", "3/2"], "--shard must be I/N with 1 <= I <= N, got 3/2"),
    (["--shard", "half"], "--shard must be I/N"),
    (["--merge", "--shard", "1/2"], "--merge computes nothing"),
    (["--merge"], "holds no study yet"),
])
def test_bad_selection_is_refused_before_work(files, capsys, extra, message):
    tmp, args = files
    out = tmp / "never"
    assert main(["probe", *args, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
