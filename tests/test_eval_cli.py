"""`atv eval` on the toolkit's own harness (always runs): plain model folders, a probe cell re-created
from a study's pinned setup (scores equal the study's record), retention and its intervals paired on the
dense run's items, the model card's lines, and every bad input refused before any model work; a missing
lmms-eval names the extra to install."""

import json
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.cli import main
from atv.experiments.eval_job import (
    DenseRun,
    EvalJob,
    EvalResult,
    ProbeCell,
    TaskScore,
    _append_to_card,
    _pair_with_dense,
    read_dense_run,
    read_dense_scores,
    run_eval_job,
)
from evaluation import evaluate
from evaluation.intervals import Bootstrap, retention_intervals
from pruning.errors import ConfigError
from pruning.io import load_model

TASKS = Path(__file__).resolve().parent / "lmms_tasks"
CHOICE, OPEN = str(TASKS / "atv_tiny_choice.jsonl"), str(TASKS / "atv_tiny_open.jsonl")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny model folder and a finished probe study (dense + text/visual/0.5) over the two test files."""
    tmp = tmp_path_factory.mktemp("eval")
    model, _ = build_tiny("llava")
    model_dir = save_model_dir("llava", model, tmp / "model")
    calib, images = write_calibration(tmp / "calib", n=3)
    out = tmp / "probe"
    assert main(["probe", "--model", str(model_dir), "--calib", str(calib), "--images", str(images), "--bench", CHOICE,
                 OPEN, "--nsamples", "3", "--sparsities", "0.5", "--pathways", "text", "--pools", "visual",
                 "--batch-size", "2", "--out", str(out)]) == 0
    return tmp, model_dir, out


def _eval(capsys, *args):
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_model_folder_scores_equal_the_harness(study, capsys):
    tmp, model_dir, _ = study
    code, out, err = _eval(capsys, "--model", model_dir, "--tasks", CHOICE, OPEN, "--batch-size", "2",
                           "--out", tmp / "dense.json")
    assert code == 0, err
    printed = json.loads(out)
    model, processor = load_model(model_dir)
    expected = evaluate(model, processor, [CHOICE, OPEN], batch_size=2, progress=False).scores()
    assert {t["name"]: t["score"] for t in printed["tasks"]} == expected
    assert [t["source"] for t in printed["tasks"]] == ["harness", "harness"]
    assert all(t["interval"][0] <= t["score"] <= t["interval"][1] for t in printed["tasks"])  # 95% over the items
    assert json.loads((tmp / "dense.json").read_text()) == printed
    assert printed["probe"] is None and printed["retention"] is None


def test_probe_cell_is_recreated_with_the_recorded_scores(study, capsys):
    tmp, _, out_dir = study
    code, out, err = _eval(capsys, "--probe-from", f"{out_dir / 'results.jsonl'}:text/visual/0.5", "--tasks", CHOICE,
                           OPEN, "--batch-size", "2", "--dense-results", out_dir / "results.jsonl")
    assert code == 0, err
    printed = json.loads(out)
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    cell = next(r for r in records if r["cell"] == {"pathway": "text", "pool": "visual", "sparsity": 0.5})
    assert {t["name"]: t["score"] for t in printed["tasks"]} == cell["scores"]
    assert printed["retention"] == pytest.approx(cell["retention"])
    assert printed["probe"]["method"] == "wanda" and printed["probe"]["nsamples"] == 3
    assert len(printed["probe"]["calibration_ids"]) == 3 and printed["environment"]["versions"]["atv-toolkit"]
    assert printed["probe"]["prune"]["mean_sparsity"] == pytest.approx(cell["prune"]["mean_sparsity"])
    # the study's dense record kept its items: retention intervals paired on them, as the study's (both seed 0)
    assert printed["retention_intervals"] == cell["intervals"]["retention"]
    assert printed["mean_retention_interval"] == cell["intervals"]["mean_retention"]


def test_study_folder_spec_and_dense_json_give_retention(study, capsys):
    tmp, model_dir, out_dir = study
    dense = tmp / "dense-only.json"
    assert _eval(capsys, "--model", model_dir, "--tasks", CHOICE, "--out", dense)[0] == 0
    result = run_eval_job(EvalJob(tasks=(CHOICE,), probe_from=ProbeCell.parse(f"{out_dir}:text/visual/0.5"),
                                  dense_results=dense, batch_size=2), progress=False)
    dense_score = read_dense_scores(dense)["atv_tiny_choice"]
    kept = 100 * result.scores()["atv_tiny_choice"] / dense_score
    assert result.retention == {"atv_tiny_choice": pytest.approx(kept)}


@pytest.mark.parametrize("spec, message", [
    ("results.jsonl", "must look like"),
    ("x/results.jsonl:text/visual", "must look like"),
    ("x/results.jsonl:audio/visual/0.5", "pathway must be one of"),
    ("x/results.jsonl:text/pixels/0.5", "pool must be one of"),
    ("x/results.jsonl:text/visual/1.5", "sparsity must be in (0, 1)"),
    ("x/results.jsonl:text/visual/half", "is not a number"),
])
def test_bad_probe_spec_is_refused(spec, message, capsys):
    code, _, err = _eval(capsys, "--probe-from", spec, "--tasks", CHOICE)
    assert code == 2 and message in err


def test_cell_outside_the_grid_is_named(study, capsys):
    _, _, out_dir = study
    code, _, err = _eval(capsys, "--probe-from", f"{out_dir}:visual/text/0.6", "--tasks", CHOICE)
    assert code == 2 and "not in the study's grid" in err and "text/visual/0.5" in err


def test_study_without_setup_is_refused(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text("")
    code, _, err = _eval(capsys, "--probe-from", f"{tmp_path}:text/visual/0.5", "--tasks", CHOICE)
    assert code == 2 and "study.json" in err


def test_missing_calibration_images_name_the_flag(study, tmp_path, capsys):
    _, _, out_dir = study
    code, _, err = _eval(capsys, "--probe-from", f"{out_dir}:text/visual/0.5", "--tasks", CHOICE,
                         "--images", tmp_path / "nope")
    assert code == 2 and "--images" in err


def test_fidelity_without_a_dense_model_is_refused(study, tmp_path, capsys):
    _, model_dir, _ = study
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text('{"id": "t1", "text": "what is a cat"}\n')
    code, _, err = _eval(capsys, "--model", model_dir, "--tasks", wiki)
    assert code == 2 and "--dense-model" in err


def test_fidelity_with_a_dense_model_scores_itself_at_100(study, tmp_path, capsys):
    _, model_dir, _ = study
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text('{"id": "t1", "text": "what is a cat"}\n{"id": "t2", "text": "the dog is red"}\n')
    code, out, err = _eval(capsys, "--model", model_dir, "--dense-model", model_dir, "--tasks", wiki)
    assert code == 0, err
    (task,) = json.loads(out)["tasks"]
    assert task["score"] == 100.0 and task["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "missing.jsonl"], "does not exist"),
    (["--tasks", CHOICE, CHOICE], "names a task twice"),
    (["--tasks", CHOICE, "--dense-results", "nope.json"], "--dense-results 'nope.json' does not exist"),
    (["--tasks", CHOICE, "--batch-size", "0"], "batch_size and max_new_tokens must be >= 1"),
])
def test_bad_arguments_are_refused(study, capsys, extra, message):
    _, model_dir, _ = study
    code, _, err = _eval(capsys, "--model", model_dir, *extra)
    assert code == 2 and message in err


def test_no_model_and_no_probe_is_refused():
    with pytest.raises(ConfigError, match="--probe-from"):
        EvalJob(tasks=(CHOICE,))


def test_lmms_task_without_lmms_eval_says_how_to_install(study, capsys, monkeypatch):
    _, model_dir, _ = study
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval -> ImportError
    code, _, err = _eval(capsys, "--model", model_dir, "--tasks", CHOICE, "pope")
    assert code == 2
    assert "['pope'] are lmms-eval task names" in err and 'pip install -e ".[lmms]"' in err


def test_bridge_probe_from_uses_the_loader_the_entry_point_registers(study, monkeypatch):
    """`lmms-eval --model atv --model_args pretrained=DIR,probe_from=CELL`: the entry point registers the
    experiments layer's cell loader; the bridge then holds the same pruned weights as `atv eval` re-creates."""
    lmms_bridge = pytest.importorskip("evaluation.lmms_bridge", exc_type=ImportError)
    from atv.experiments.eval_job import lmms_manifest, load_eval_model

    _, model_dir, out_dir = study
    spec = f"{out_dir}:text/visual/0.5"
    monkeypatch.setattr(lmms_bridge, "_cell_loader", None)
    with pytest.raises(ConfigError, match="probe-cell loader"):
        lmms_bridge.ATVModel(pretrained=str(model_dir), probe_from=spec)
    assert lmms_manifest().model_id == "atv"
    lm = lmms_bridge.ATVModel(pretrained=str(model_dir), probe_from=spec)
    expected = load_eval_model(None, ProbeCell.parse(spec)).model.state_dict()
    got = lm.model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(got[k].equal(expected[k]) for k in got)


# -- retention intervals paired on the dense run's items -------------------------------------------------
# the tiny model's item scores (read back from each run) are choice [1, 1, 0, 0, 0] and open [0, 0, 0, 0, 0]
DENSE_ITEMS = {"atv_tiny_choice": [1, 0, 1, 1, 0.5], "atv_tiny_open": [1, 1, 0, 0.25, 1]}  # means 0.7, 0.65


def _dense_json(path, items, with_items=("atv_tiny_choice", "atv_tiny_open"), ids=None):
    """A dense `atv eval` JSON written by hand: scores from DENSE_ITEMS, items (with ``ids``) for ``with_items``."""
    tasks = [{"name": name, "score": 100 * sum(scores) / len(scores),
              **({"items": {"ids": ids or items[name]["ids"], "scores": scores}} if name in with_items else {})}
             for name, scores in DENSE_ITEMS.items()]
    path.write_text(json.dumps({"tasks": tasks}))
    return path


@pytest.fixture(scope="module")
def model_items(study):
    """The tiny model's compact items per task (ids digest and scores), from a plain `atv eval` run."""
    _, model_dir, _ = study
    result = run_eval_job(EvalJob(tasks=(CHOICE, OPEN), model=str(model_dir), batch_size=2), progress=False)
    return {t.name: t.items for t in result.tasks}


def test_dense_eval_json_keeps_the_items_and_reads_back(study, model_items):
    tmp, model_dir, _ = study
    out = tmp / "dense-items.json"
    run_eval_job(EvalJob(tasks=(CHOICE,), model=str(model_dir), batch_size=2, out=out, overwrite=True),
                 progress=False)
    written = json.loads(out.read_text())["tasks"][0]["items"]
    assert written == model_items["atv_tiny_choice"] and len(written["scores"]) == 5
    dense = read_dense_run(out)
    assert dense.items == {"atv_tiny_choice": written} and dense.scores == read_dense_scores(out)


def test_retention_intervals_equal_the_direct_paired_bootstrap(study, model_items, tmp_path):
    _, model_dir, _ = study
    dense = _dense_json(tmp_path / "dense.json", model_items)
    result = run_eval_job(EvalJob(tasks=(CHOICE, OPEN), model=str(model_dir), batch_size=2, dense_results=dense,
                                  seed=3), progress=False)
    mine = {t.name: t.items["scores"] for t in result.tasks}
    assert mine == {"atv_tiny_choice": [1, 1, 0, 0, 0], "atv_tiny_open": [0, 0, 0, 0, 0]}  # what DENSE_ITEMS assume
    assert result.retention == {"atv_tiny_choice": pytest.approx(100 * 0.4 / 0.7), "atv_tiny_open": 0.0}
    expected = retention_intervals(mine, DENSE_ITEMS, Bootstrap(seed=3))
    assert result.retention_intervals == {n: i.to_list() for n, i in expected.per_benchmark.items()}
    assert result.mean_retention_interval == expected.mean.to_list()
    low, high = result.retention_intervals["atv_tiny_choice"]
    assert low < 100 * 0.4 / 0.7 < high and result.retention_intervals["atv_tiny_open"] == [0.0, 0.0]
    printed = json.loads(result.to_json())
    assert printed["retention_intervals"] == result.retention_intervals
    assert printed["mean_retention_interval"] == result.mean_retention_interval


def test_pairing_resamples_with_the_given_seed():
    """30 hand-made items (5 are too few: the percentile bounds land on the same values for every seed)."""
    cell = [i % 3 // 2 for i in range(30)]  # 10 of 30 right
    dense = [(i % 7) / 6 for i in range(30)]
    items = {"ids": "abc", "scores": cell}
    intervals = {}
    for seed in (0, 3):
        result = EvalResult("m", None, [TaskScore("t", "harness", "choice score (%)", 100 / 3, items=items)],
                            retention={"t": 100 * 10 / sum(dense)}, mean_retention=100 * 10 / sum(dense))
        _pair_with_dense(result, DenseRun({"t": 100 * sum(dense) / 30}, {"t": {"ids": "abc", "scores": dense}}),
                         Bootstrap(seed=seed))
        expected = retention_intervals({"t": cell}, {"t": dense}, Bootstrap(seed=seed))
        assert result.retention_intervals == {"t": expected.per_benchmark["t"].to_list()}
        assert result.mean_retention_interval == expected.mean.to_list()
        intervals[seed] = result.retention_intervals["t"]
    assert intervals[0] != intervals[3]


def test_dense_file_without_items_gives_retention_alone(study, model_items, tmp_path, caplog):
    _, model_dir, _ = study
    dense = _dense_json(tmp_path / "old.json", model_items, with_items=())
    result = run_eval_job(EvalJob(tasks=(CHOICE,), model=str(model_dir), batch_size=2, dense_results=dense),
                          progress=False)
    assert result.retention == {"atv_tiny_choice": pytest.approx(100 * 0.4 / 0.7)}
    assert result.retention_intervals is None and result.mean_retention_interval is None
    assert "atv_tiny_choice: the dense results hold no per-item scores" in caplog.text


def test_partly_paired_tasks_give_no_mean_interval(study, model_items, tmp_path, caplog):
    _, model_dir, _ = study
    dense = _dense_json(tmp_path / "half.json", model_items, with_items=("atv_tiny_choice",))
    result = run_eval_job(EvalJob(tasks=(CHOICE, OPEN), model=str(model_dir), batch_size=2, dense_results=dense),
                          progress=False)
    expected = retention_intervals({"atv_tiny_choice": [1, 1, 0, 0, 0]}, DENSE_ITEMS, Bootstrap(seed=0))
    assert result.retention_intervals == {"atv_tiny_choice": expected.per_benchmark["atv_tiny_choice"].to_list()}
    assert result.mean_retention is not None and result.mean_retention_interval is None
    assert "atv_tiny_open: the dense results hold no per-item scores" in caplog.text


@pytest.mark.parametrize("ids, drop", [("0123456789abcdef", False), (None, True)])
def test_dense_items_of_other_items_give_no_interval(study, model_items, tmp_path, caplog, ids, drop):
    """Other item ids, or the same ids with another item count: the retention stays, without interval."""
    _, model_dir, _ = study
    dense = _dense_json(tmp_path / "other.json", model_items, ids=ids)
    if drop:  # same ids digest, one item fewer
        data = json.loads(dense.read_text())
        data["tasks"][0]["items"]["scores"].pop()
        dense.write_text(json.dumps(data))
    result = run_eval_job(EvalJob(tasks=(CHOICE,), model=str(model_dir), batch_size=2, dense_results=dense),
                          progress=False)
    assert result.retention == {"atv_tiny_choice": pytest.approx(100 * 0.4 / 0.7)}
    assert result.retention_intervals is None and result.mean_retention_interval is None
    assert "atv_tiny_choice: the dense run scored other items" in caplog.text


@pytest.mark.parametrize("items, message", [
    ({"ids": "x", "scores": [0.5, 2.0]}, "outside [0, 1]"),
    ({"scores": [1, 0]}, "unreadable scores or items"),
    ({"ids": "x", "scores": ["a"]}, "unreadable scores or items"),
])
def test_bad_dense_items_are_refused(tmp_path, items, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"tasks": [{"name": "t", "score": 50.0, "items": items}]}))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        read_dense_run(path)


def test_card_lines_carry_the_intervals(tmp_path):
    (tmp_path / "README.md").write_text("# pruned\n\nNo evaluation recorded yet.\n")
    tasks = [TaskScore("digit", "harness", "choice score (%)", 50.0, interval=[25.0, 75.0]),
             TaskScore("pope", "lmms-eval", "acc", 70.0)]
    result = EvalResult("m", None, tasks, retention={"digit": 80.0, "pope": 87.5}, mean_retention=83.75,
                        retention_intervals={"digit": [60.0, 100.0]})
    _append_to_card(tmp_path, result, seed=3)
    assert (tmp_path / "README.md").read_text().splitlines()[2:] == [
        "### atv eval: harness, lmms-eval, seed 3, mean retention 83.75 (% of dense)", "",
        "| task | metric | score | retention (% of dense) |", "|---|---|---:|---:|",
        "| digit | choice score (%) | 50.00 [25.0, 75.0] | 80.00 [60.0, 100.0] |",
        "| pope | acc | 70.00 | 87.50 |"]
    result.tasks, result.mean_retention_interval = tasks[:1], [70.5, 95.25]
    _append_to_card(tmp_path, result, seed=3)
    assert "### atv eval: harness, seed 3, mean retention 83.75 [70.5, 95.2] (% of dense)" in \
        (tmp_path / "README.md").read_text()
