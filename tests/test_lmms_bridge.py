"""The lmms-eval bridge on offline YAML tasks (tests/lmms_tasks: harness JSONL files read through the HF
json loader): the same generations and choices as the toolkit harness on a tiny LLaVA, plain and probed;
stop sequences; registration for `lmms-eval --model atv`; lmms-eval tasks in a probe study and in `atv eval`."""

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is not installed (the lmms extra)")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from tiny_models import build_tiny  # noqa: E402
from tiny_processors import make_processor, save_model_dir, write_calibration  # noqa: E402

from atv.cli import main  # noqa: E402
from atv.experiments.probe_study import StudyConfig, run_probe_study  # noqa: E402
from evaluation import evaluate  # noqa: E402
from evaluation.lmms_bridge import (  # noqa: E402
    ATVModel,
    LmmsTask,
    bridge_prompt,
    cut_at_stop,
    manifest,
    register,
    task_manager,
    write_lmms_task,
)
from evaluation.model_io import _StopSequences  # noqa: E402
from mot_probe import attach_probe_, probe_pool  # noqa: E402
from pruning.config import PruneConfig  # noqa: E402
from pruning.data import load_llava_conversations  # noqa: E402
from pruning.errors import ConfigError  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lmms_tasks"
NAMES = ("atv_tiny_choice", "atv_tiny_open")
FILES = [TASKS / f"{name}.jsonl" for name in NAMES]
MAX_NEW_TOKENS = 6  # atv_tiny_open.yaml's generation_kwargs


@pytest.fixture(scope="module")
def manager():
    return task_manager([TASKS], include_defaults=False)


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny("llava")
    return model, make_processor("llava", model)


def _bridge(model, processor, manager, tasks=NAMES, batch_size=2):
    out = simple_evaluate(model=ATVModel(model=model, processor=processor, batch_size=batch_size), tasks=list(tasks),
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    samples = {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in tasks}
    return out["results"], samples


def _assert_bridge_equals_harness(model, processor, manager):
    results, samples = _bridge(model, processor, manager)
    harness = evaluate(model, processor, FILES, batch_size=2, max_new_tokens=MAX_NEW_TOKENS, return_items=True,
                       progress=False)
    choice, open_ = harness["atv_tiny_choice"], harness["atv_tiny_open"]
    # open answers: the very same strings
    assert [s["filtered_resps"][0] for s in samples["atv_tiny_open"]] == [i.prediction for i in open_.items]
    assert results["atv_tiny_open"]["vqa_acc,none"] * 100 == pytest.approx(open_.score)
    # choices: the bridge returns -log p per option, the harness log p
    for sample, item in zip(samples["atv_tiny_choice"], choice.items):
        losses = [resp[0][0] for resp in sample["resps"]]
        assert losses == pytest.approx([-lp for lp in item.details["logprobs"]], abs=1e-4)
    assert results["atv_tiny_choice"]["acc,none"] * 100 == pytest.approx(choice.score)
    return harness


def test_bridge_generates_and_chooses_as_the_harness(tiny, manager):
    _assert_bridge_equals_harness(*tiny, manager)


def test_bridge_on_a_probe_model_equals_the_harness(tmp_path, manager):
    model, _ = build_tiny("llava")
    processor = make_processor("llava", model)
    dense = evaluate(model, processor, FILES[:1], batch_size=2, return_items=True, progress=False)
    calib, images = write_calibration(tmp_path, n=3)
    batches, _ = load_llava_conversations(calib, images, processor, nsamples=3)
    probe = attach_probe_(model)
    probe.prune_path_("text", PruneConfig("wanda", sparsity=0.5, pool=probe_pool("visual")), batches, progress=False)
    try:
        pruned = _assert_bridge_equals_harness(model, processor, manager)
    finally:
        probe.unload()
    before = [lp for i in dense["atv_tiny_choice"].items for lp in i.details["logprobs"]]
    after = [lp for i in pruned["atv_tiny_choice"].items for lp in i.details["logprobs"]]
    assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3  # the pruned path is what was scored


def test_generated_task_files_match_the_static_ones(tiny, tmp_path):
    names = [write_lmms_task(path, tmp_path, max_new_tokens=MAX_NEW_TOKENS) for path in FILES]
    assert names == ["atv_atv_tiny_choice", "atv_atv_tiny_open"]
    generated = _bridge(*tiny, task_manager([tmp_path], include_defaults=False), tasks=names)[1]
    static = _bridge(*tiny, task_manager([TASKS], include_defaults=False))[1]
    for name, original in zip(names, NAMES):
        assert [s["resps"] for s in generated[name]] == [s["resps"] for s in static[original]]


def test_cut_at_stop():
    assert cut_at_stop(" red\nQ: blue", ["\n", "Q:"]) == "red"
    assert cut_at_stop("red blue", ["Q:", ""]) == "red blue"
    assert cut_at_stop("Q: red", ["Q:"]) == ""


def _requests(items, gen_kwargs):
    """Requests shaped as lmms-eval builds them for generate_until, over a dict 'dataset'."""
    return [SimpleNamespace(args=(q, dict(gen_kwargs), lambda doc: doc["visual"], i, "t", "test"))
            for i, (q, _) in enumerate(items)]


def test_stop_sequences_cut_and_halt_generation(tiny):
    model, processor = tiny
    lm = ATVModel(model=model, processor=processor, batch_size=2)
    items = [("what is shown here", None), ("describe it", None), ("what is a cat", None)]
    lm.task_dict = {"t": {"test": [{"visual": []} for _ in items]}}
    full = lm.generate_until(_requests(items, {"max_new_tokens": 12}))
    row = max(range(len(full)), key=lambda r: len(full[r]))
    assert len(full[row]) >= 4, full  # the tiny model says enough to cut
    stop = full[row][2:4]  # may fall inside a token: the text is cut, not the tokens
    cut = lm.generate_until(_requests(items, {"max_new_tokens": 12, "until": [stop]}))
    assert cut == [cut_at_stop(text, [stop]) for text in full]
    assert cut[row] == full[row][:full[row].find(stop)].strip()


def test_stop_criterion_marks_rows_whose_new_text_holds_a_stop(tiny):
    _, processor = tiny
    tokenizer = processor.tokenizer
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["what", "red", "cat", "dog"]),
                        tokenizer.convert_tokens_to_ids(["cat", "blue", "one", "two"])])
    assert _StopSequences(tokenizer, 1, ["cat"])(ids, None).tolist() == [True, False]  # row 1's cat is in the prompt
    assert _StopSequences(tokenizer, 1, ["one two"])(ids, None).tolist() == [False, True]


def test_non_image_visuals_are_refused(tiny):
    model, processor = tiny
    lm = ATVModel(model=model, processor=processor)
    lm.task_dict = {"t": {"test": [{"visual": ["clip.mp4"]}]}}
    with pytest.raises(ConfigError, match="images only"):
        lm.generate_until(_requests([("what is shown here", None)], {}))


def test_multi_image_prompt_extends_the_harness_prompt(tiny):
    _, processor = tiny
    assert bridge_prompt(processor, "what is it", 2).count("<image>") == 2
    assert bridge_prompt(processor, "what is it", 1).count("<image>") == 1


@pytest.mark.parametrize("kwargs, message", [
    ({}, "either model= and processor="),
    ({"pretrained": "x", "model": object()}, "either model= and processor="),
    ({"model": object()}, "needs its processor"),
    ({"pretrained": "x", "colour": "red"}, "unknown model_args"),
    ({"pretrained": "x", "batch_size": "auto"}, "'auto' is not supported"),
    ({"pretrained": "x", "batch_size": 0}, "must be >= 1"),
])
def test_bad_model_args_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ATVModel(**kwargs)


def test_model_args_string_loads_a_folder(tiny, tmp_path, manager):
    model, processor = tiny
    folder = save_model_dir("llava", model, tmp_path / "model")
    lm = ATVModel.create_from_arg_string(f"pretrained={folder},batch_size=2", {"device": "cpu"})
    assert lm.batch_size == 2
    out = simple_evaluate(model=lm, tasks=["atv_tiny_open"], task_manager=manager, bootstrap_iters=0)
    harness = evaluate(model, processor, FILES[1:], batch_size=2, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert out["results"]["atv_tiny_open"]["vqa_acc,none"] * 100 == pytest.approx(harness.scores()["atv_tiny_open"])


def test_registered_model_name_resolves_to_the_bridge():
    from lmms_eval import models
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()  # what lmms-eval does with the entry point's payload
    registry.register_manifest(manifest())
    assert registry.get_model_class("atv") is ATVModel
    register()
    assert models.get_model("atv") is ATVModel


def test_lmms_eval_command_line_runs_the_bridge(tiny, tmp_path):
    if "atv" not in [ep.name for ep in entry_points(group="lmms_eval.models")]:
        pytest.skip("the lmms_eval.models entry point is not installed (pyproject.toml, then pip install -e .)")
    model, _ = tiny
    folder = save_model_dir("llava", model, tmp_path / "model")
    exe = shutil.which("lmms-eval") or pytest.skip("no lmms-eval executable on PATH")
    done = subprocess.run([exe, "eval", "--model", "atv", "--model_args", f"pretrained={folder},batch_size=2",
                           "--tasks", "atv_tiny_choice", "--include_path", str(TASKS), "--output_path",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "Error" not in log, log[-3000:]
    row = next(line for line in log.splitlines() if line.startswith("|atv_tiny_choice"))  # the results table
    assert "|acc" in row


def test_probe_study_scores_an_lmms_task_as_the_harness(tmp_path):
    model, _ = build_tiny("llava")
    processor = make_processor("llava", model)
    calib, images = write_calibration(tmp_path, n=3)
    batches, _ = load_llava_conversations(calib, images, processor, nsamples=3)
    config = StudyConfig(pathways=("text",), pools=("visual",), sparsities=(0.5,), batch_size=2,
                         max_new_tokens=MAX_NEW_TOKENS)
    harness = run_probe_study(model, processor, batches, FILES[1:], tmp_path / "harness", config, progress=False)
    task = LmmsTask("atv_tiny_open", include_path=(TASKS,), include_defaults=False, batch_size=2)
    bridged = run_probe_study(model, processor, batches, [task], tmp_path / "lmms", config, progress=False)
    for a, b in zip(harness.records, bridged.records):
        assert a["cell"] == b["cell"]
        assert b["scores"]["atv_tiny_open"] == pytest.approx(a["scores"]["atv_tiny_open"])


def test_lmms_task_score_must_be_a_percentage(tiny, manager):
    task = LmmsTask("atv_tiny_choice", kind="choice", scale=1000.0, include_path=(TASKS,), include_defaults=False)
    task._manager = manager
    model, processor = tiny
    if evaluate(model, processor, FILES[:1], progress=False).scores()["atv_tiny_choice"] <= 10:
        pytest.skip("the tiny model scores too low for the scale check")
    with pytest.raises(ConfigError, match="not a percentage"):
        task.evaluate(model, processor)


def test_atv_eval_mixes_harness_files_and_lmms_tasks(tiny, tmp_path, capsys):
    model, processor = tiny
    folder = save_model_dir("llava", model, tmp_path / "model")
    code = main(["eval", "--model", str(folder), "--tasks", str(FILES[0]), "atv_tiny_open", "--lmms-include",
                 str(TASKS), "--no-lmms-defaults", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    tasks = json.loads(captured.out)["tasks"]
    assert [(t["name"], t["source"], t["metric"]) for t in tasks] == [
        ("atv_tiny_choice", "harness", "choice score (%)"), ("atv_tiny_open", "lmms-eval", "vqa_acc")]
    harness = evaluate(model, processor, FILES, batch_size=2, max_new_tokens=MAX_NEW_TOKENS, progress=False).scores()
    assert tasks[0]["score"] == harness["atv_tiny_choice"]
    assert tasks[1]["score"] * 100 == pytest.approx(harness["atv_tiny_open"])


def test_atv_eval_unknown_lmms_task_is_named(tiny, tmp_path, capsys):
    model, _ = tiny
    folder = save_model_dir("llava", model, tmp_path / "model")
    code = main(["eval", "--model", str(folder), "--tasks", "no_such_task", "--lmms-include", str(TASKS),
                 "--no-lmms-defaults"])
    assert code == 2 and "unknown lmms-eval task(s) ['no_such_task']" in capsys.readouterr().err


def test_importing_the_bridge_without_lmms_eval_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")
                 or m == "evaluation.lmms_bridge"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lmms\]"'):
        import evaluation.lmms_bridge  # noqa: F401


def _default_model_ready() -> bool:
    from atv import default_model as dm

    built = (dm.cache_root() / dm.MODEL_NAME / "config.json").is_file()
    parts = (dm.ASSETS_DIR / dm.PARTS_FILE).is_file()
    return built or ((dm.cache_root() / "smollm2" / dm.GGUF_NAME).is_file() and parts)


@pytest.mark.slow
@pytest.mark.skipif(not _default_model_ready(), reason="smol-llava is not built and its parts/GGUF are not available")
def test_default_model_on_two_suite_tasks_scores_as_the_harness(tmp_path):
    from atv.default_model import build_default_model
    from atv.suite import write_suite
    from pruning.io import load_model

    model, processor = load_model(build_default_model(progress=False))
    suite = write_suite(tmp_path / "suite", n_eval=16, n_calib=4)
    files = [suite / "scene-colour.jsonl", suite / "digit-plus.jsonl"]  # a choice and an open benchmark
    names = [write_lmms_task(path, tmp_path / "tasks", max_new_tokens=8) for path in files]
    manager = task_manager([tmp_path / "tasks"], include_defaults=False)
    out = simple_evaluate(model=ATVModel(model=model, processor=processor, batch_size=8), tasks=names,
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    harness = evaluate(model, processor, files, batch_size=8, max_new_tokens=8, return_items=True, progress=False)
    choice, open_ = harness["scene-colour"], harness["digit-plus"]
    assert out["results"][names[0]]["acc,none"] * 100 == pytest.approx(choice.score)
    assert out["results"][names[1]]["vqa_acc,none"] * 100 == pytest.approx(open_.score)
    samples = sorted(out["samples"][names[1]], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == [i.prediction for i in open_.items]
