"""The probe study: grid, JSONL records, resume after an interruption, the published table layout."""


import numpy as np
import pytest
from tiny_studies import in_memory_study

from analysis.tables import probe_table, to_csv, to_latex, to_markdown
from atv.experiments.probe_study import StudyConfig, run_probe_study
from atv.experiments.records import RESULTS, read_records
from pruning.errors import ConfigError, ToolkitError


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return in_memory_study(tmp_path_factory.mktemp("bench"), ("the cat is red", "one two three blue dog"))


def _run(setup, out, **kwargs):
    model, processor, calibration, benches = setup
    config = StudyConfig(sparsities=(0.5, 0.6), batch_size=2)
    return run_probe_study(model, processor, calibration, benches, out, config, progress=False, **kwargs)


@pytest.fixture(scope="module")
def full(setup, tmp_path_factory):
    return _run(setup, tmp_path_factory.mktemp("full"))


def test_interrupted_study_resumes_only_missing_cells_and_gives_the_same_table(setup, full, tmp_path):
    assert full.computed == 13 and len(full.records) == 13
    seen = []

    def stop_after_five(record):
        seen.append(record)
        if len(seen) == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(setup, tmp_path / "cut", on_cell=stop_after_five)
    with (tmp_path / "cut" / RESULTS).open("a") as f:
        f.write('{"cell": {"pathway": "te')  # a record torn by the kill
    resumed = _run(setup, tmp_path / "cut")
    assert resumed.computed == 8
    assert [r["scores"] for r in resumed.records] == [r["scores"] for r in full.records]
    assert (tmp_path / "cut" / "probe_table.md").read_text() == (full.out_dir / "probe_table.md").read_text()
    assert len(read_records(tmp_path / "cut" / RESULTS)) == 13


def test_table_has_the_published_layout(full):
    result = full
    header, rows = result.table
    assert header == ["pathway", "calibration", "50% sparsity", "60% sparsity"]
    assert [row[:2] for row in rows] == [[p, q] for p in ("text", "visual") for q in ("text", "visual", "mixed")]
    dense = result.records[0]
    assert dense["cell"] == {"pathway": "dense"} and dense["mean_retention"] == pytest.approx(100.0)
    assert dense["scores"]["fidelity"] == pytest.approx(100.0)
    for record in result.records[1:]:
        expected = np.mean([100 * record["scores"][b] / dense["scores"][b] for b in dense["scores"]
                            if dense["scores"][b] > 0])
        assert record["mean_retention"] == pytest.approx(expected)
    assert (result.out_dir / "probe_table.csv").read_text().startswith("pathway,calibration,50% sparsity")


def test_a_different_setup_in_the_same_folder_is_refused(setup, full):
    model, processor, calibration, benches = setup
    with pytest.raises(ToolkitError, match="different setup.*config"):
        run_probe_study(model, processor, calibration, benches, full.out_dir, StudyConfig(sparsities=(0.7,)),
                        progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"pathways": ("audio",)}, "unknown pathway"),
    ({"pools": ("pixels",)}, "unknown probe pool 'pixels'"),
    ({"sparsities": (1.2,)}, r"\(0, 1\)"),
    ({"method": "magnitude"}, "'magnitude'"),
])
def test_bad_study_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        StudyConfig(**kwargs)


def test_table_writers_by_hand():
    records = [{"cell": {"pathway": "dense"}, "mean_retention": 100.0},
               {"cell": {"pathway": "text", "pool": "text", "sparsity": 0.5}, "mean_retention": 98.256},
               {"cell": {"pathway": "text", "pool": "text", "sparsity": 0.6}, "mean_retention": 84.65},
               {"cell": {"pathway": "visual", "pool": "mixed", "sparsity": 0.5}, "mean_retention": 100.14}]
    table = probe_table(records)
    assert to_markdown(table) == ("| pathway | calibration | 50% sparsity | 60% sparsity |\n|---|---|---:|---:|\n"
                                  "| text | text | 98.26 | 84.65 |\n| visual | mixed | 100.14 | – |\n")
    assert to_csv(table).splitlines()[2] == "visual,mixed,100.14,–"
    latex = to_latex(table)
    assert r"\toprule" in latex and r"50\% sparsity" in latex and "100.14 & -- \\\\" in latex


def test_study_records_keep_every_item_and_its_intervals(full):
    dense, cell = full.records[0], full.records[1]
    assert [len(dense["items"][b]["scores"]) for b in ("look", "fidelity")] == [4, 2]
    assert dense["items"]["fidelity"]["scores"] == [1, 1]  # the dense model agrees with itself
    assert dense["intervals"]["mean_retention"] == [100.0, 100.0]
    for name, (low, high) in cell["intervals"]["scores"].items():
        assert low <= cell["scores"][name] <= high
        items = cell["items"][name]["scores"]
        assert cell["scores"][name] == pytest.approx(100 * sum(items) / len(items), abs=1e-4)
    assert set(cell["intervals"]["retention"]) == set(cell["retention"]) and "mean_retention" in cell["intervals"]
