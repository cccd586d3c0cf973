"""Hostile inputs: files a user did not write (a shipped recipe, links and FIFOs in a study folder, lmms-eval
model_args) never run a model folder's Python nor write outside the output folder.

The hostile model folder's config names Python code (``auto_map``) that leaves a sentinel file when it runs:
every case checks the refusal's message, that the sentinel is absent and that nothing outside changed.
"""

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.cli import main
from pruning.outputs import MARKER, mark_folder

TASKS = Path(__file__).resolve().parent / "lmms_tasks"
BENCH = TASKS / "atv_tiny_choice.jsonl"
EVIL = """from pathlib import Path
from transformers import LlavaConfig

Path({sentinel!r}).write_text("the model folder's code ran")


class EvilConfig(LlavaConfig):
    pass
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, hostile folder, sentinel, calib, images): a tiny LLaVA, and a copy whose config names code."""
    tmp = tmp_path_factory.mktemp("hostile")
    model, _ = build_tiny("llava")
    folder = save_model_dir("llava", model, tmp / "model")
    hostile = save_model_dir("llava", model, tmp / "hostile")
    sentinel = tmp / "code-ran"
    (hostile / "evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    config = json.loads((hostile / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (hostile / "config.json").write_text(json.dumps(config))
    calib, images = write_calibration(tmp / "calib", n=3)
    return folder, hostile, sentinel, calib, images


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """Where transformers would copy a folder's code to import it (kept out of the user's cache)."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def _run(capsys, *args):
    """(exit code, the error lines: stderr without transformers' progress bars)."""
    code = main([*map(str, args)])
    return code, "\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("atv"))


def _study(folder, calib, images):
    return ["--model", folder, "--calib", calib, "--images", images, "--bench", BENCH, "--nsamples", "2",
            "--pathways", "text", "--pools", "text", "--sparsities", "0.5", "--batch-size", "2"]


# -- rule 1: remote code only from the command line ----------------------------------------------------
@pytest.mark.parametrize("command, key", [("prune", "trust_remote_code"), ("prune", "trust-remote-code"),
                                          ("probe", "trust_remote_code")])
def test_a_recipe_cannot_turn_on_remote_code(base, tmp_path, capsys, command, key):
    folder, hostile, sentinel, calib, images = base
    options = {"prune": {"model": str(hostile), "method": "magnitude", "sparsity": 0.5},
               "probe": dict(zip(["model", "calib", "images", "bench", "nsamples", "pathways", "pools",
                                  "sparsities"], [str(hostile), str(calib), str(images), [str(BENCH)], 2, ["text"],
                                                  ["text"], [0.5]]))}[command]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**options, key: True}))
    code, err = _run(capsys, command, "--recipe", recipe, "--out", tmp_path / "out")
    assert code == 2 and f"sets {key}: true" in err and "pass --trust-remote-code on the command line" in err, err
    assert len(err.splitlines()) == 1 and str(recipe) in err
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_a_saved_recipe_never_carries_remote_code(base, tmp_path, capsys):
    folder, _, _, _, _ = base
    out = tmp_path / "pruned"
    code, err = _run(capsys, "prune", "--model", folder, "--method", "magnitude", "--sparsity", "0.5",
                     "--trust-remote-code", "--out", out)
    assert code == 0, err
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["method"] == "magnitude" and "trust_remote_code" not in saved
    code, err = _run(capsys, "prune", "--recipe", out / "recipe.yaml", "--out", tmp_path / "again")
    assert code == 0, err


# -- rule 2: never follow a link out of the output folder ----------------------------------------------
@pytest.mark.parametrize("name, kind", [("results.jsonl", "link"), (".atv-lock", "link"),
                                        ("records.shard-1-of-2.jsonl", "link"), ("results.jsonl", "fifo")])
def test_study_files_never_lead_out_of_the_folder(base, tmp_path, capsys, name, kind):
    folder, _, _, calib, images = base
    study, outside = tmp_path / "study", tmp_path / "outside.txt"
    mark_folder(study, "study")  # a study folder of the toolkit's (an unmarked one is refused as a user's)
    outside.write_text("a user's own notes")  # no newline at the end: a torn record to the log
    reader = None
    if kind == "link":
        (study / name).symlink_to(outside)
    else:
        os.mkfifo(study / name)
        reader = os.open(study / name, os.O_RDONLY | os.O_NONBLOCK)  # so that a writer's open would not block
    shard = ["--shard", "1/2"] if "shard" in name else []
    try:
        code, err = _run(capsys, "probe", *_study(folder, calib, images), *shard, "--out", study)
    finally:
        if reader is not None:
            os.close(reader)
    what = "is a symbolic link" if kind == "link" else "is not a regular file"
    assert code == 2 and what in err and str(study / name) in err and "choose another --out" in err, err
    assert len(err.splitlines()) == 1
    assert outside.read_text() == "a user's own notes"
    left = {p.name for p in study.iterdir()} - {name, MARKER}  # at most a free lock of its own: nothing else
    assert left <= {".atv-lock", ".atv-lock.shard-1-of-2"} and all((study / n).read_text() == "" for n in left)


# -- rule 3: lmms-eval's model_args cannot override --trust-remote-code ----------------------------------
@pytest.mark.parametrize("model_args", ["trust_remote_code=True", "batch_size=1, trust_remote_code = true",
                                        "trust_remote_code=False"])
def test_lmms_model_args_cannot_set_remote_code(base, tmp_path, capsys, monkeypatch, model_args):
    _, hostile, sentinel, _, _ = base
    if importlib.util.find_spec("decord") is None:  # llava_hf imports this video reader; image tasks never call it
        monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=None, cpu=None))
    code, err = _run(capsys, "eval", "--model", hostile, "--tasks", "atv_tiny_open", "--lmms-include", TASKS,
                     "--no-lmms-defaults", "--lmms-model", "llava_hf", "--lmms-model-args", model_args,
                     "--device", "cpu", "--out", tmp_path / "r.json")
    assert code == 2 and "trust_remote_code= is set by --trust-remote-code" in err, err
    assert not sentinel.exists() and not (tmp_path / "r.json").exists()


def test_extra_model_args_from_python_cannot_set_remote_code():
    from evaluation.lmms_runs import stock_model_args
    from pruning.errors import ConfigError
    from pruning.io import LoadOptions

    class Stock:  # the shape of lmms-eval's classes
        def __init__(self, pretrained, trust_remote_code=False, **kwargs):
            pass

    with pytest.raises(ConfigError, match="trust_remote_code= is set by the loading options"):
        stock_model_args(Stock, "m", LoadOptions(), "cpu", {"trust_remote_code": "True"})
