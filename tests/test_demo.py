"""`atv demo` end to end on a stand-in: a tiny LLaVA checkpoint in place of smol-llava, the real suite."""

import json
from pathlib import Path

import pytest
from tiny_models import build_tiny
from tiny_processors import save_model_dir

from atv.cli import main
from atv.experiments.demo import DemoConfig, finding_pairs, finding_verdicts, run_demo, timing_table
from pruning.errors import ConfigError


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    model, _ = build_tiny("llava")
    folder = save_model_dir("llava", model, tmp / "smol-stand-in")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("atv.default_model.build_default_model", lambda *a, **k: folder)
        args = ["demo", "--quick", "--out", str(tmp / "demo"), "--nsamples", "3", "--n-eval", "2",
                "--calib-batch-size", "2"]  # a full and a partial padded calibration batch
        assert main(args) == 0
        results = {p: p.read_bytes() for p in (tmp / "demo").glob("*/results.jsonl")}
        assert main(args) == 0  # a second run resumes: no cell is recomputed
        assert results == {p: p.read_bytes() for p in (tmp / "demo").glob("*/results.jsonl")}
        yield tmp / "demo", patch


def test_demo_writes_tables_figures_and_report(demo_run):
    out, _ = demo_run
    report = (out / "report.md").read_text()
    assert "| pathway | calibration | 40% sparsity |" in report and "## Figures" in report
    for name in ("probe/probe_table.md", "methods/results.jsonl", "analysis/drift.pt", "figures/sensitivity.png",
                 "figures/mask_iou.png", "figures/tsne.png", "figures/methods_retention.png"):
        assert (out / name).is_file(), name
    probe_cells = [json.loads(line)["cell"] for line in (out / "probe" / "results.jsonl").read_text().splitlines()]
    assert len(probe_cells) == 1 + 2  # dense + the two pathways with the mixed pool at one sparsity
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["dense"]) == set(json.loads((out / "suite" / "suite.json").read_text())["benchmarks"])
    assert summary["skipped"] == {"sensitivity map": "this demo has no map step (the full demo has one)"}


def test_demo_report_gives_intervals_findings_and_a_timing_table(demo_run):
    out, _ = demo_run
    report = (out / "report.md").read_text()
    probe = report.split("## MoT probe")[1].split("##")[0]
    assert probe.count(" [") == 2  # every probe cell's mean retention with its interval
    findings = report.split("## Findings as paired differences")[1].split("## Figures")[0]
    assert "| finding | A | B | A: mean retention | B: mean retention | A − B | separates |" in findings
    assert "| B | visual/mixed/0.4 | text/mixed/0.4 |" in findings and "| methods | atv/40% | wanda/40% |" in findings
    shows = findings.split("### What this run shows")[1]
    assert "**B**: the text pathway is more fragile" in shows and "visual/mixed/0.4 − text/mixed/0.4 = " in shows
    timing = report.split("## Time")[1]
    assert "| step | wall time | seconds | CPU seconds |" in timing and "| total |" in timing and "{" not in timing
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["cpu_seconds"]) == set(summary["seconds"]) == {"setup", "probe", "methods", "analysis"}
    dense = json.loads((out / "demo.json").read_text())["dense"]
    assert all(len(row["interval"]) == 2 for row in dense.values())


def test_timing_table_and_finding_pairs_by_hand():
    assert timing_table({"setup": 12.34, "probe": 481.0}) == (
        "| step | wall time | seconds |\n|---|---:|---:|\n| setup | 0:12 | 12.3 |\n| probe | 8:01 | 481.0 |\n"
        "| total | 8:13 | 493.3 |\n")
    probe = [{"cell": {"pathway": "dense"}}] + [{"cell": {"pathway": p, "pool": q, "sparsity": 0.5}}
                                                 for p in ("text", "visual") for q in ("text", "visual")]
    methods = [{"cell": {"method": "dense", "setting": "dense"}}, {"cell": {"method": "atv", "setting": "50%"}},
               {"cell": {"method": "wanda", "setting": "50%"}}, {"cell": {"method": "atv", "setting": "2:4"}}]
    assert finding_pairs(probe, methods) == [
        ("B", "visual/text/0.5", "text/text/0.5"), ("B", "visual/visual/0.5", "text/visual/0.5"),
        ("A", "text/text/0.5", "text/visual/0.5"), ("A", "visual/visual/0.5", "visual/text/0.5"),
        ("methods", "atv/50%", "wanda/50%")]  # atv/2:4 has no wanda cell to pair with


def test_timing_table_with_cpu_time_by_hand():
    assert timing_table({"setup": 12.34, "probe": 481.0}, {"setup": 3.0, "probe": 200.25}) == (
        "| step | wall time | seconds | CPU seconds |\n|---|---:|---:|---:|\n| setup | 0:12 | 12.3 | 3.0 |\n"
        "| probe | 8:01 | 481.0 | 200.2 |\n| total | 8:13 | 493.3 | 203.2 |\n")


def test_allocation_cells_pair_with_their_uniform_method():
    methods = [{"cell": {"method": m, "setting": s}} for m, s in (("dense", "dense"), ("atv", "40%"), ("wanda", "40%"),
                                                                   ("atv+owl", "40%"), ("atv+map", "40%"),
                                                                   ("wanda+owl", "50%"))]
    assert finding_pairs([{"cell": {"pathway": "dense"}}], methods) == [
        ("methods", "atv/40%", "wanda/40%"), ("allocation", "atv+owl/40%", "atv/40%"),
        ("allocation", "atv+map/40%", "atv/40%")]  # wanda+owl/50% has no wanda/50% cell


def test_finding_verdicts_name_each_pair_and_count_holds_reversed_and_open():
    def diff(finding, a, b, value, low, high):
        return {"finding": finding, "a": a, "b": b, "rows": {"mean retention": {"diff": value, "diff_ci": [low, high]}}}

    differences = [diff("B", "visual/text/0.4", "text/text/0.4", 30.0, 20.04, 40.0),
                   diff("B", "visual/visual/0.4", "text/visual/0.4", 5.0, -1.0, 11.0),
                   diff("methods", "atv/40%", "wanda/40%", -6.0, -9.5, -2.25),
                   {"finding": "A", "a": "x", "b": "y", "rows": {"mean retention": {"diff": 1.0, "diff_ci": None}}}]
    assert finding_verdicts(differences) == [
        "**B**: the text pathway is more fragile than the visual one (visual path − text path, same pool). Of 2 "
        "pair(s): holds in 1, not separated in 1. visual/text/0.4 − text/text/0.4 = 30.0 [20.0, 40.0] (holds); "
        "visual/visual/0.4 − text/visual/0.4 = 5.0 [-1.0, 11.0] (not separated).",
        "**methods**: ATV keeps more than Wanda on the shared weights (ATV − Wanda). Of 1 pair(s): reversed in 1. "
        "atv/40% − wanda/40% = -6.0 [-9.5, -2.2] (reversed)."]  # A has no interval: left out


def test_demo_refuses_a_suite_written_with_other_settings(demo_run):
    out, _ = demo_run
    with pytest.raises(ConfigError, match="holds a suite"):
        run_demo(DemoConfig(out=out, quick=True, nsamples=4, n_eval=2), progress=False)


def test_demo_config_rejects_bad_counts():
    with pytest.raises(ConfigError, match="batch_size=0: must be >= 1"):
        DemoConfig(batch_size=0)
    with pytest.raises(ConfigError, match="n_eval=-1, calib_batch_size=0: must be >= 1"):
        DemoConfig(n_eval=-1, calib_batch_size=0)
    quick = DemoConfig(quick=True)
    assert (quick.probe_sparsities, quick.pools, quick.methods, quick.settings, quick.n_eval, quick.nsamples) == (
        (0.4,), ("mixed",), ("atv", "wanda"), ("40%",), 12, 8)
    assert not quick.map_step and quick.map_folder is None and quick.out == Path("runs/demo-quick")
    full = DemoConfig()
    assert full.out == Path("runs/demo")  # the quick and full demos do not share a folder
    assert (full.probe_sparsities, full.pools, full.methods, full.settings, full.n_eval, full.nsamples) == (
        (0.3, 0.4, 0.5), ("text", "visual", "mixed"), ("atv", "wanda", "atv+owl", "atv+map"), ("40%", "50%"), 20, 32)
    assert full.map_step and full.map_folder == Path("runs/demo/map") and full.compare_config().allocation_map == \
        str(Path("runs/demo/map"))
    assert DemoConfig(no_map=True).methods == ("atv", "wanda", "atv+owl") and not DemoConfig(no_map=True).map_step
    given = DemoConfig(allocation_map=Path("runs/map"))
    assert given.methods == ("atv", "wanda", "atv+owl", "atv+map") and not given.map_step
    assert given.map_folder == Path("runs/map")
    with pytest.raises(ConfigError, match="map_items=0: must be >= 1"):
        DemoConfig(map_items=0)
    with pytest.raises(ConfigError, match=r"unknown method 'atv\+best'"):
        DemoConfig(methods=("atv+best",))
    with pytest.raises(ConfigError, match="allocation 'map' needs allocation_map"):
        DemoConfig(methods=("atv+map",), quick=True)
    with pytest.raises(ConfigError, match="unknown probe pool 'audio'"):
        DemoConfig(pools=("audio",))


def test_a_demo_probe_cell_is_recreated_by_atv_eval_with_its_recorded_scores(demo_run, capsys):
    out, _ = demo_run
    setup = json.loads((out / "probe" / "study.json").read_text())
    assert setup["calib_batch_size"] == 2 and setup["images"] == str(out / "suite")
    assert not Path(setup["model"]).is_absolute()  # relative to the output: no machine path
    digit = out / "suite" / "digit.jsonl"
    capsys.readouterr()
    assert main(["eval", "--probe-from", f"{out / 'probe'}:text/mixed/0.4", "--tasks", str(digit),
                 "--batch-size", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "probe" / "results.jsonl").read_text().splitlines()]
    cell = next(r for r in records if r["cell"] == {"pathway": "text", "pool": "mixed", "sparsity": 0.4})
    assert printed["tasks"][0]["score"] == cell["scores"]["digit"]
    assert printed["probe"]["prune"]["mean_sparsity"] == pytest.approx(cell["prune"]["mean_sparsity"])


def test_full_demo_maps_the_model_and_prunes_with_the_map(tmp_path):
    """The full demo's map step on the stand-in: held-out prompts, the map, atv+map cells, the report's map section."""
    model, _ = build_tiny("llava")
    folder = save_model_dir("llava", model, tmp_path / "smol-stand-in")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("atv.default_model.build_default_model", lambda *a, **k: folder)
        assert main(["demo", "--out", str(tmp_path / "demo"), "--nsamples", "2", "--n-eval", "2",
                     "--calib-batch-size", "2", "--probe-sparsities", "0.5", "--pools", "mixed", "--settings", "40%",
                     "--methods", "atv", "atv+map", "--map-items", "7"]) == 0
    out = tmp_path / "demo"
    prompts = json.loads((out / "map_prompts" / "suite.json").read_text())
    assert prompts["split"] == "train" and prompts["per_benchmark"] == 1
    setup = json.loads((out / "map" / "study.json").read_text())
    assert setup["config"]["map_items"] == 7
    map_records = [json.loads(line) for line in (out / "map" / "results.jsonl").read_text().splitlines()]
    assert len(map_records) == 1 + 2 * 2 * 2 and all(len(r["kl_items"]) == 7 for r in map_records)
    methods = [json.loads(line) for line in (out / "methods" / "results.jsonl").read_text().splitlines()]
    allocated = next(r for r in methods if r["cell"]["method"] == "atv+map")
    assert allocated["prune"]["config"]["allocation"] == "map"
    report = (out / "report.md").read_text()
    section = report.split("## Sensitivity map")[1].split("## Methods")[0]
    assert "| projections | cells | text: mean KL | visual: mean KL | text − visual | separates |" in section
    assert "| both | 8 |" in section and "**B (map)**" in report and "![sensitivity_map]" in report
    summary = json.loads((out / "demo.json").read_text())
    assert list(summary["seconds"]) == ["setup", "probe", "map", "methods", "analysis"]
