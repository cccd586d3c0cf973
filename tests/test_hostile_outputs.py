"""Nothing a user owns is lost, whatever the output options say (reliability round 3).

Each case is a user's folder (a tiny model, calibration data, benchmarks, a finished study, a pruned
model and the user's own files), a command run in this process through ``atv.cli.main`` (or the job
function it calls), and then: the exit code or exception is a one-line refusal naming the culprit, and
every file of the user's folder is byte-identical (or, for the result log, only grew).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from cli_batch import tree
from tiny_processors import write_user_folder

from atv.cli import main

STUDY = ["probe", "--model", "model", "--calib", "calib/calib.json", "--images", "calib/images", "--bench",
         "look.jsonl", "--nsamples", "2", "--pathways", "text", "--pools", "text", "--sparsities", "0.5",
         "--batch-size", "2"]
PRUNE = ["prune", "--model", "model", "--method", "magnitude"]
USER_FILES = {"notes.txt": "a user's own file", "recipe.yaml": "# my own recipe\nsparsity: 0.9\n",
              "probe_table.md": "| my | table |\n", "report.md": "# my report\n", "demo.json": '{"mine": true}',
              "README.md": "# my model card\n"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A user's folder: model, calibration, a benchmark, a finished probe study, a pruned model, user files."""
    base = tmp_path_factory.mktemp("hostile") / "base"
    write_user_folder(base)
    (base / "userdata").mkdir()
    for name, text in USER_FILES.items():
        (base / "userdata" / name).write_text(text)
    shutil.copytree(base / "model", base / "mymodel")  # a model folder the user wrote, with the user's card
    (base / "mymodel" / "README.md").write_text(USER_FILES["README.md"])
    here = Path.cwd()
    os.chdir(base)
    try:
        assert main([*STUDY, "--out", "study"]) == 0
        assert main([*PRUNE, "--out", "pruned"]) == 0
    finally:
        os.chdir(here)
    return base


@pytest.fixture
def user(world, tmp_path, monkeypatch):
    """A fresh copy of the user's folder, as the working folder."""
    root = tmp_path / "base"
    shutil.copytree(world, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def _refused(capsys, code: int, culprit: str) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and culprit in errors[0], err[-3000:]
    return errors[0]


# -- 1. the result log keeps every complete record -------------------------------------------------------
def test_a_resumed_log_keeps_a_complete_last_record_without_its_newline(user, capsys):
    """A kill between a record and its newline: the record is kept (a torn one is dropped: test_probe_study)."""
    log = user / "study" / "results.jsonl"
    whole = log.read_bytes()
    log.write_bytes(whole.rstrip(b"\n"))
    assert main([*STUDY, "--out", "study"]) == 0
    assert "0 cells computed, 2 resumed" in capsys.readouterr().out
    assert log.read_bytes() == whole


def test_an_append_after_an_unterminated_record_starts_a_new_line(tmp_path):
    from atv.experiments.records import ResultLog

    setup = {"config": {"seed": 0}}
    first = ResultLog(tmp_path, setup)
    first.append({"cell": {"pathway": "dense"}, "scores": {}})
    log = tmp_path / "results.jsonl"
    complete = log.read_bytes().rstrip(b"\n")
    log.write_bytes(complete)
    again = ResultLog(tmp_path, setup)
    assert len(again.records) == 1 and log.read_bytes() == complete + b"\n"
    again.append({"cell": {"pathway": "text"}, "scores": {}})
    assert [json.loads(line)["cell"]["pathway"] for line in log.read_text().splitlines()] == ["dense", "text"]


# -- 2. an output never lies inside or over an input -----------------------------------------------------
EVAL = ["eval", "--tasks", "look.jsonl", "--overwrite"]
CELL = ["--probe-from", "study:text/text/0.5"]
INSIDE_INPUTS = {  # name -> (argv, the error line names)
    "eval-out-over-model-config": ([*EVAL, "--model", "model", "--out", "model/config.json"],
                                   "inside the input 'model'"),
    "eval-out-over-model-weights": ([*EVAL, "--model", "model", "--out", "model/model.safetensors"],
                                    "inside the input 'model'"),
    "eval-out-over-benchmark-image": ([*EVAL, "--model", "model", "--out", "calib/images/0.png"],
                                      "holds the input 'calib/images/0.png'"),
    "eval-out-over-study-calibration": ([*EVAL, *CELL, "--out", "calib/calib.json"],
                                        "holds the input 'calib/calib.json'"),
    "eval-out-over-study-results": ([*EVAL, *CELL, "--out", "study/results.jsonl"],
                                    "holds the input 'study/results.jsonl'"),
    "eval-out-inside-study-images": ([*EVAL, *CELL, "--out", "calib/images/new.json"],
                                     "inside the input 'calib/images'"),
    "eval-output-path-inside-model": (["eval", "--tasks", "mme", "--model", "model", "--output-path", "model/lmms"],
                                      "inside the input 'model'"),
}


@pytest.mark.parametrize("name", list(INSIDE_INPUTS))
def test_an_output_inside_or_over_an_input_is_refused(user, capsys, name):
    argv, culprit = INSIDE_INPUTS[name]
    if "--output-path" in argv:
        pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is not installed (the lmms extra)")
    before = tree(user)
    _refused(capsys, main(argv), culprit)
    assert tree(user) == before


# -- 3. what appears in --out while a run works is never deleted ------------------------------------------
DURING_RUN = {  # what the user does to --out while atv prune runs -> the path the refusal names
    "file-added": (lambda out: (out / "notes.txt").write_text("written during the run"), "notes.txt"),
    "folder-added": (lambda out: (out / "mine").mkdir() or (out / "mine" / "a.txt").write_text("mine"), "mine"),
    "card-edited": (lambda out: (out / "README.md").write_text("# my edits to the card\n"), "README.md"),
}


@pytest.mark.parametrize("name", list(DURING_RUN))
def test_the_final_swap_never_deletes_what_appeared_during_the_run(user, capsys, monkeypatch, name):
    import atv.experiments.prune_job as prune_job

    act, culprit = DURING_RUN[name]
    real = prune_job.prune_

    def prune_while_the_user_writes(*args, **kwargs):
        act(user / "pruned")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_job, "prune_", prune_while_the_user_writes)
    before = tree(user / "pruned")
    line = _refused(capsys, main([*PRUNE, "--out", "pruned", "--overwrite", "--sparsity", "0.6"]), culprit)
    after = tree(user / "pruned")
    assert {k: v for k, v in after.items() if k in before and not k.startswith(culprit)} == \
        {k: v for k, v in before.items() if not k.startswith(culprit)}  # the old folder as it was, the user's edit kept
    assert any(k.startswith(culprit) for k in after) and after != before
    kept = [p for p in user.iterdir() if p.name.startswith("pruned.new-")]
    assert len(kept) == 1 and repr(kept[0].name) in line.replace(str(user) + "/", "")
    assert json.loads((kept[0] / "prune_report.json").read_text())["config"]["sparsity"] == 0.6
    assert not [p for p in user.iterdir() if p.name.startswith(".pruned.")]  # nothing hidden left behind


# -- 4. no command replaces or appends to a file the toolkit did not write --------------------------------
FOREIGN = {  # name -> (working folder, argv, the error line names, the folder that must stay byte-identical)
    "demo-out-is-the-working-folder": ("userdata", ["demo", "--quick", "--out", "."], "working folder", "userdata"),
    "demo-out-is-a-users-model": (".", ["demo", "--quick", "--out", "model"], "did not write", "model"),
    "demo-out-is-user-data": (".", ["demo", "--quick", "--out", "userdata"], "did not write", "userdata"),
    "probe-out-is-user-data": (".", [*STUDY, "--out", "userdata"], "did not write", "userdata"),
    "eval-card-of-a-users-model": (".", ["eval", "--tasks", "look.jsonl", "--model", "mymodel", "--out-card"],
                                   "not written by atv-toolkit", "mymodel"),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_a_file_the_toolkit_did_not_write_is_never_replaced(user, capsys, monkeypatch, name):
    import atv.default_model

    def no_build(*args, **kwargs):  # the refusal comes first; never fetch the default model in a test
        raise RuntimeError("the demo started working on a folder it should have refused")

    monkeypatch.setattr(atv.default_model, "build_default_model", no_build)
    cwd, argv, culprit, watched = FOREIGN[name]
    monkeypatch.chdir(user / cwd)
    before = tree(user / watched)
    _refused(capsys, main(argv), culprit)
    assert tree(user / watched) == before


def test_a_study_folder_is_marked_and_resumed(user, capsys):
    """A new study folder gets the toolkit's marker, so the same command resumes it."""
    from pruning.outputs import written_by_toolkit

    assert written_by_toolkit(user / "study")
    assert main([*STUDY, "--out", "study"]) == 0 and "0 cells computed, 2 resumed" in capsys.readouterr().out
