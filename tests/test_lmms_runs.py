"""`atv eval` as papers report lmms-eval numbers (offline tasks in tests/lmms_tasks, a tiny LLaVA folder):
lmms-eval's --limit, --bootstrap-iters, --log-samples and --output-path reach simple_evaluate and its files;
--lmms-model scores a saved folder with lmms-eval's own class for the family (as `lmms-eval --model NAME`
does); the bridge run under two processes (torchrun, gloo) gives the scores of one process."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is not installed (the lmms extra)")

import lmms_eval.evaluator  # noqa: E402
from tiny_models import build_tiny  # noqa: E402
from tiny_processors import make_processor  # noqa: E402

from atv.cli import main  # noqa: E402
from atv.experiments.eval_job import EvalJob, run_eval_job  # noqa: E402
from evaluation.lmms_bridge import write_lmms_task  # noqa: E402
from evaluation.lmms_runs import (  # noqa: E402
    LmmsRun,
    parse_model_args,
    stock_model_args,
    stock_model_class,
    stock_model_name,
    task_manager,
)
from pruning.errors import ConfigError, ToolkitError  # noqa: E402
from pruning.io import LoadOptions  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lmms_tasks"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny LLaVA checkpoint folder whose tokenizer has an end-of-sequence token (lmms-eval's classes stop
    generation on it)."""
    model, _ = build_tiny("llava")
    processor = make_processor("llava", model)
    processor.tokenizer.eos_token = "<|end|>"
    path = tmp_path_factory.mktemp("lmms") / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _eval(capsys, *args):
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _lmms(*args):
    return ["--lmms-include", TASKS, "--no-lmms-defaults", *args]


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments of every simple_evaluate call (and still runs it)."""
    calls = []
    real = lmms_eval.evaluator.simple_evaluate

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", recording)
    return calls


def _one_file(folder: Path, pattern: str) -> Path:
    found = list(folder.rglob(pattern))
    assert len(found) == 1, (pattern, sorted(folder.rglob("*")))
    return found[0]


# -- pass-through ---------------------------------------------------------------------------------------


def test_limit_bootstrap_and_samples_reach_lmms_eval(folder, tmp_path, capsys, spy):
    logs = tmp_path / "logs"
    code, out, err = _eval(capsys, "--model", folder, "--tasks", "atv_tiny_choice", *_lmms(
        "--limit", "4", "--bootstrap-iters", "50", "--log-samples", "--output-path", logs, "--batch-size", "2"))
    assert code == 0, err
    (call,) = spy
    assert (call["limit"], call["bootstrap_iters"], call["log_samples"]) == (4, 50, True)
    assert call["evaluation_tracker"] is not None
    (task,) = json.loads(out)["tasks"]
    assert task["n"] == 4  # the task has 5 items
    samples = [json.loads(line) for line in _one_file(logs, "*_samples_atv_tiny_choice.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    accs = [s["acc"] for s in samples]
    mean = sum(accs) / 4
    assert task["score"] == pytest.approx(mean)
    # lmms-eval's stderr of a mean: the sample standard deviation over sqrt(n)
    assert task["stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 3) / 2)
    results = json.loads(_one_file(logs, "*_results.json").read_text())
    assert results["config"]["limit"] == 4 and results["config"]["bootstrap_iters"] == 50
    assert results["config"]["model_args"] == f"pretrained={folder}"
    assert results["results"]["atv_tiny_choice"]["acc,none"] == pytest.approx(mean)
    assert not list(logs.glob(".atv-lmms-partial-*"))  # the staging folder is gone


def test_defaults_keep_samples_and_stderr_off(folder, tmp_path, capsys, spy):
    code, out, err = _eval(capsys, "--model", folder, "--tasks", "atv_tiny_open", *_lmms())
    assert code == 0, err
    (call,) = spy
    assert (call["limit"], call["bootstrap_iters"], call["log_samples"], call["evaluation_tracker"]) == \
        (None, 0, False, None)
    (task,) = json.loads(out)["tasks"]
    assert task["n"] == 5 and task["stderr"] is None
    assert json.loads(out)["lmms"]["model"] == "atv"


def test_results_without_samples_are_written_too(folder, tmp_path, capsys):
    logs = tmp_path / "logs"
    code, _, err = _eval(capsys, "--model", folder, "--tasks", "atv_tiny_open", *_lmms("--output-path", logs))
    assert code == 0, err
    assert _one_file(logs, "*_results.json") and not list(logs.rglob("*_samples_*"))


def test_a_failed_run_leaves_nothing_in_output_path(folder, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", failing)
    logs = tmp_path / "logs"
    job = EvalJob(tasks=("atv_tiny_open",), model=str(folder), lmms_include=(TASKS,), lmms_defaults=False,
                  log_samples=True, output_path=logs, out=tmp_path / "r.json")
    with pytest.raises(RuntimeError, match="broke"):
        run_eval_job(job, progress=False)
    assert list(logs.iterdir()) == [] and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "atv_tiny_open", "--log-samples"], "give --output-path DIR"),
    (["--tasks", "atv_tiny_open", "--bootstrap-iters", "-1"], "bootstrap_iters must be >= 0"),
    (["--tasks", "atv_tiny_open", "--limit", "0"], "limit must be >= 1"),
    (["--tasks", str(TASKS / "atv_tiny_choice.jsonl"), "--bootstrap-iters", "10"], "apply to lmms-eval tasks"),
    (["--tasks", "atv_tiny_open", "--lmms-model-args", "max_pixels=1"], "give it too"),
    (["--tasks", "atv_tiny_open", "--lmms-model", "llava_hf", "--lmms-model-args", "oops"], "key=value"),
    (["--tasks", "atv_tiny_open", "--lmms-model", "llava_hf", "--lmms-model-args", "pretrained=x"], "--model"),
    (["--tasks", "atv_tiny_open", "--lmms-model", "no_such_class"], "not an lmms-eval model name"),
    (["--tasks", "atv_tiny_open", "--lmms-model", "atv"], "the toolkit's bridge"),
])
def test_bad_lmms_options_are_refused_before_loading(folder, capsys, extra, message):
    code, _, err = _eval(capsys, "--model", folder, *_lmms(*extra))
    assert code == 2 and message in err, err


def test_output_path_that_is_a_file_is_refused(folder, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.write_text("")
    code, _, err = _eval(capsys, "--model", folder, "--tasks", "atv_tiny_open", *_lmms("--output-path", logs))
    assert code == 2 and "is a file" in err


def test_lmms_model_refuses_a_probe_cell(capsys):
    code, _, err = _eval(capsys, "--probe-from", "runs/p/results.jsonl:text/visual/0.5", "--tasks", "atv_tiny_open",
                         "--lmms-model", "llava_hf")
    assert code == 2 and "exists only in memory" in err


# -- lmms-eval's stock model classes -----------------------------------------------------------------------


def test_auto_names_the_family_class():
    assert stock_model_name("auto", "llava") == "llava_hf"
    assert stock_model_name("auto", "qwen2_vl") == "qwen2_vl"
    assert stock_model_name("qwen2_5_vl", None) == "qwen2_5_vl"
    with pytest.raises(ConfigError, match="model_type 'paligemma'"):
        stock_model_name("auto", "paligemma")


class _Declares:  # the shape of lmms-eval's classes: some settings declared, the rest **kwargs
    def __init__(self, pretrained, device="cuda", device_map="", dtype="auto", batch_size=1, **kwargs):
        pass


class _Fewer:
    def __init__(self, pretrained, revision="main", trust_remote_code=True, device_map="auto", **kwargs):
        pass


def test_stock_model_args_are_only_those_the_class_declares():
    load = LoadOptions(dtype="bfloat16", revision="v2", trust_remote_code=False)
    assert stock_model_args(_Declares, "m", load, "dev0") == {"pretrained": "m", "dtype": "bfloat16", "device": "dev0",
                                                             "device_map": "dev0"}
    assert stock_model_args(_Fewer, "m", load, "dev0", {"max_pixels": "9"}) == {
        "pretrained": "m", "trust_remote_code": False, "revision": "v2", "device_map": "dev0", "max_pixels": "9"}
    assert stock_model_args(_Declares, "m", LoadOptions(device_map="auto"), "dev0")["device_map"] == "auto"
    assert parse_model_args(" max_pixels=9, use_cache=false ,") == {"max_pixels": "9", "use_cache": "false"}


@pytest.fixture
def video_reader(monkeypatch):
    """lmms-eval's llava_hf imports decord (a video reader) at import time; image tasks never call it. Where
    decord is not installed (the --no-deps CI install) a stand-in lets the class import."""
    if importlib.util.find_spec("decord") is None:
        monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=None, cpu=None))


@pytest.fixture(scope="module")
def image_tasks(tmp_path_factory):
    """The open test task without its text-only items (lmms-eval's llava_hf classes need an image)."""
    tmp = tmp_path_factory.mktemp("image-tasks")
    lines = [line for line in (TASKS / "atv_tiny_open.jsonl").read_text().splitlines() if '"image": null' not in line]
    shutil.copytree(TASKS / "images", tmp / "images")
    (tmp / "open_img.jsonl").write_text("\n".join(lines) + "\n")
    name = write_lmms_task(tmp / "open_img.jsonl", tmp / "tasks", name="atv_tiny_open_img", max_new_tokens=6)
    return name, tmp / "tasks", len(lines)


@pytest.mark.parametrize("flags, backend", [(["--lmms-model", "auto"], "lmms_eval.models.chat.llava_hf.LlavaHf"),
                                            (["--lmms-model", "llava_hf", "--lmms-force-simple"],
                                             "lmms_eval.models.simple.llava_hf.LlavaHf")])
def test_stock_class_scores_a_folder_as_lmms_eval_itself(folder, image_tasks, tmp_path, capsys, video_reader, flags,
                                                         backend):
    name, include, n = image_tasks
    logs = tmp_path / "logs"
    code, out, err = _eval(capsys, "--model", folder, "--tasks", name, "--lmms-include", include, "--no-lmms-defaults",
                           "--output-path", logs, "--log-samples", *flags)
    assert code == 0, err
    printed = json.loads(out)
    (task,) = printed["tasks"]
    assert printed["lmms"]["model"] == "llava_hf" and printed["lmms"]["model_args"].startswith(f"pretrained={folder},")
    assert task["n"] == n
    results = json.loads(_one_file(logs, "*_results.json").read_text())
    assert results["config"]["model_backend"].startswith(backend)  # lmms-eval's class ran, not the bridge
    # the same numbers and answers as lmms-eval's own entry point with that class on the folder
    expected = lmms_eval.evaluator.simple_evaluate(
        model="llava_hf", model_args=f"pretrained={folder},device=cpu,device_map=cpu", tasks=[name],
        task_manager=task_manager([include], include_defaults=False), bootstrap_iters=0, log_samples=True,
        force_simple="--lmms-force-simple" in flags)
    assert task["score"] == pytest.approx(expected["results"][name]["vqa_acc,none"])
    answers = {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, _one_file(logs, "*_samples_*").read_text()
                                                             .splitlines())}
    assert answers == {s["doc_id"]: s["filtered_resps"][0] for s in expected["samples"][name]}


def test_a_missing_dependency_of_the_class_is_named(monkeypatch):
    for module in [m for m in sys.modules if m.startswith("lmms_eval.models.") and m.endswith("llava_hf")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    with pytest.raises(ToolkitError, match="decord"):
        stock_model_class("llava_hf")


def test_run_settings_are_validated():
    with pytest.raises(ConfigError, match="--output-path"):
        LmmsRun(log_samples=True)
    assert LmmsRun(output_path="logs").output_path == Path("logs")


# -- several processes ------------------------------------------------------------------------------------


def test_two_processes_score_as_one(folder, tmp_path, capsys):
    """torchrun starts two CPU processes (gloo); each takes its share of the docs, process 0 gathers,
    scores and writes; the scores equal a one-process run's, and every doc is in the samples file.

    Both runs compute on one thread: torchrun gives each process one (OMP_NUM_THREADS=1), and a CPU matmul's
    last bits depend on the thread count (a log-likelihood of the tiny model moves by ~5e-7 between one and two
    threads), so a one-process run on this process's threads could break a near-tie the other way."""
    args = ["--model", str(folder), "--tasks", "atv_tiny_choice", "atv_tiny_open", *map(str, _lmms(
        "--batch-size", "1", "--bootstrap-iters", "10"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = _eval(capsys, *args)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    one = json.loads(out)["tasks"]
    logs = tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "atv.cli", "-v", "eval", *args, "--output-path", str(logs), "--log-samples",
                           "--out", str(tmp_path / "two.json")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout)  # one report: process 1 prints nothing
    assert two == json.loads((tmp_path / "two.json").read_text())
    # lmms-eval sums the gathered per-doc metrics rank by rank, the one process in doc order: equal up to the
    # rounding of that order (one doc scored differently would move a score by at least 1/n)
    assert [(t["name"], t["n"]) for t in two["tasks"]] == [(t["name"], t["n"]) for t in one]
    for got, want in zip(two["tasks"], one):
        assert math.isclose(got["score"], want["score"], rel_tol=1e-12, abs_tol=1e-15), (got, want)
        assert math.isclose(got["stderr"], want["stderr"], rel_tol=1e-12, abs_tol=1e-15), (got, want)
    for rank in (0, 1):  # both processes scored a share
        assert f"process {rank} of 2:" in done.stderr
    samples = _one_file(logs, "*_samples_atv_tiny_open.jsonl").read_text().splitlines()
    assert sorted(json.loads(s)["doc_id"] for s in samples) == [0, 1, 2, 3, 4]
