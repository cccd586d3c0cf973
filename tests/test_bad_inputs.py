"""Every bad input is one clear line, nothing a user owns is lost, resume never reuses stale results.

Each case is a real `atv` process (tests/cli_batch.py forks one per case after importing once) on a tiny
model; it must exit 2 with a one-line error naming the culprit, print no traceback, and leave every file
of its folder byte-identical. Kills at exact points of a folder swap, changed inputs of a study being
resumed, and a held study lock are cases of the same kind.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from atv.experiments.records import study_lock

ROOT = Path(__file__).resolve().parents[1]
STUDY = ["--calib", "calib/calib.json", "--images", "calib/images", "--bench", "look.jsonl", "text.jsonl",
         "--nsamples", "2", "--pathways", "text", "--pools", "text", "--sparsities", "0.5", "--batch-size", "2"]
PRUNE = ["prune", "--model", "model", "--method", "magnitude"]
CALIB = ["--calib", "calib/calib.json", "--images", "calib/images"]


def batch(cases: list[dict], scratch: Path, warm: Path) -> list[dict]:
    """Run ``cases`` (argv, cwd, watch, kill_at_rename) through tests/cli_batch.py (``warm``: the model folder
    whose modules are imported before the forks)."""
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch.py"), str(scratch / "cases.json"),
                    str(scratch / "results.json"), str(warm)], cwd=ROOT, env=env, check=True, timeout=600)
    return json.loads((scratch / "results.json").read_text())


def _record(i: int, **changes) -> dict:
    record = {"id": f"s{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\ndescribe the image"}, {"from": "gpt", "value": "a red cat"}]}
    return {**record, **changes}


def _write(path: Path, data) -> None:
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


def _jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def _look(image: str = "calib/images/{i}.png") -> list[dict]:
    return [{"id": f"q{i}", "image": image.format(i=i), "question": "what is shown here", "options": ["cat", "dog"],
             "answer": ["cat", "dog"][i % 2]} for i in range(2)]


def _make_base(base: Path) -> None:
    """A user's folder: a tiny model, calibration data, benchmarks, and broken variants of each."""
    model, _ = build_tiny("llava")
    save_model_dir("llava", model, base / "model")
    write_calibration(base / "calib", n=3)
    _jsonl(base / "look.jsonl", _look())
    _jsonl(base / "text.jsonl", [{"id": f"t{i}", "text": f"a short passage number {i} about cats"} for i in range(2)])
    (base / "userdata").mkdir()
    (base / "userdata" / "notes.txt").write_text("a user's own file")
    (base / "afile").write_text("a plain file")
    (base / "outside").mkdir()
    (base / "outside" / "secret.png").write_bytes((base / "calib" / "images" / "0.png").read_bytes())
    png = (base / "calib" / "images" / "1.png").read_bytes()
    broken = base / "broken"
    broken.mkdir()
    (broken / "truncated.png").write_bytes(png[: len(png) * 2 // 3])
    (broken / "text.png").write_text("not an image")
    shutil.copy(base / "calib" / "images" / "0.png", broken / "0.png")
    shutil.copy(base / "calib" / "images" / "1.png", broken / "1.png")
    data = {
        "calib_outside.json": [_record(0, image="../../outside/secret.png"), _record(1)],
        "calib_absolute.json": [_record(0, image="/etc/passwd"), _record(1)],
        "calib_strings.json": ["describe the image", "a cat"],
        "calib_turn_strings.json": [_record(0, conversations=["<image>\nwhat is it", "a cat"])],
        "calib_no_tag.json": [_record(0, conversations=[{"from": "human", "value": "what"},
                                                        {"from": "gpt", "value": "a cat"}])],
        "calib_image_list.json": [_record(0, image=["0.png", "1.png"])],
        "calib_image_int.json": [_record(0, image=3)],
        "calib_latin1.json": json.dumps([_record(0, id="caf\u00e9")], ensure_ascii=False).encode("latin-1"),
        "calib_broken.json": [_record(0, image="truncated.png"), _record(1, image="text.png"),
                              _record(2, image="0.png")],
    }
    for name, content in data.items():
        _write(base / name, content)
    _jsonl(base / "look_outside.jsonl", _look("calib/../../outside/secret.png"))
    shutil.copy(base / "outside" / "secret.png", base.parent / "elsewhere.png")
    _jsonl(base / "look_absolute.jsonl", _look(str(base.parent / "elsewhere.png")))
    _jsonl(base / "look_broken.jsonl", _look("broken/truncated.png"))
    _jsonl(base / "look_notimage.jsonl", _look("broken/text.png"))
    (base / "look_latin1.jsonl").write_bytes(json.dumps(_look()[0], ensure_ascii=False).replace(
        "what", "qu\u00e9").encode("latin-1") + b"\n")
    (base / "figs" / "probe").mkdir(parents=True)
    (base / "figs" / "probe" / "results.jsonl").write_text('{"cell": {"pathway"\n{"cell": {}}\n')
    _model_variants(base)


def _model_variants(base: Path) -> None:
    weights = (base / "model" / "model.safetensors").read_bytes()
    for name in ("model_truncated", "model_empty", "model_badconfig", "model_unknown", "model_noweights"):
        shutil.copytree(base / "model", base / name)
    (base / "model_truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (base / "model_empty" / "model.safetensors").write_bytes(b"")
    (base / "model_badconfig" / "config.json").write_text("{not json")
    config = json.loads((base / "model" / "config.json").read_text())
    (base / "model_unknown" / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    (base / "model_noweights" / "model.safetensors").unlink()


# name -> (argv, what the error line must name); run in the base folder, which must stay byte-identical
CASES = {
    # 1. outputs that would destroy what the user owns
    "out-is-working-folder": (PRUNE + ["--out", ".", "--overwrite"], "working folder"),
    "out-is-an-ancestor": (PRUNE + ["--out", "..", "--overwrite"], "working folder"),
    "out-is-the-model": (PRUNE + ["--out", "model", "--overwrite"], "holds the input"),
    "out-holds-calibration": (PRUNE[:-2] + ["--method", "wanda", *CALIB, "--out", "calib", "--overwrite"],
                              "holds the input"),
    "out-is-user-data": (PRUNE + ["--out", "userdata", "--overwrite"], "not written by atv-toolkit"),
    "out-not-empty": (PRUNE + ["--out", "userdata"], "is not empty"),
    "out-under-a-file": (PRUNE + ["--out", "afile/pruned"], "is a file"),
    "suite-over-user-data": (["suite", "--out", "userdata", "--overwrite", "--quick"], "not written by atv-toolkit"),
    "suite-in-working-folder": (["suite", "--out", ".", "--overwrite", "--quick"], "working folder"),
    # 2. eval --out, checked before any work
    "eval-out-exists": (["eval", "--tasks", "look.jsonl", "--model", "model", "--out", "afile"], "exists"),
    "eval-out-under-a-file": (["eval", "--tasks", "look.jsonl", "--model", "model", "--out", "afile/r.json"],
                              "is a file"),
    "eval-out-is-the-benchmark": (["eval", "--tasks", "look.jsonl", "--model", "model", "--out", "look.jsonl",
                                   "--overwrite"], "holds the input"),
    "eval-out-is-a-folder": (["eval", "--tasks", "look.jsonl", "--model", "model", "--out", "userdata"],
                             "is a folder"),
    # 4. image paths that leave their folder
    "calib-image-outside": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_outside.json", "--images",
                                          "calib/images", "--nsamples", "1", "--out", "new"], "outside the image"),
    "calib-image-absolute": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_absolute.json", "--images",
                                           "calib/images", "--nsamples", "1", "--out", "new"], "/etc/passwd"),
    "bench-image-outside": (["eval", "--tasks", "look_outside.jsonl", "--model", "model"], "outside the benchmark"),
    "bench-image-absolute": (["eval", "--tasks", "look_absolute.jsonl", "--model", "model"], "outside the benchmark"),
    # 7. inputs that used to end in a traceback
    "calib-unreadable-images": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_broken.json", "--images",
                                              "broken", "--nsamples", "2", "--out", "new"], "'unreadable_image': 2"),
    "calib-records-strings": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_strings.json", "--images",
                                            "calib/images", "--out", "new"], "record 0 is a str"),
    "calib-turns-strings": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_turn_strings.json", "--images",
                                          "calib/images", "--nsamples", "1", "--out", "new"], "a turn is a str"),
    "calib-no-image-tag": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_no_tag.json", "--images",
                                         "calib/images", "--nsamples", "1", "--out", "new"], "no <image> tag"),
    "calib-image-list": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_image_list.json", "--images",
                                       "calib/images", "--nsamples", "1", "--out", "new"], "one path string"),
    "calib-image-int": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_image_int.json", "--images",
                                      "calib/images", "--nsamples", "1", "--out", "new"], "one path string"),
    "calib-not-utf8": (PRUNE[:-2] + ["--method", "wanda", "--calib", "calib_latin1.json", "--images",
                                     "calib/images", "--out", "new"], "not UTF-8"),
    "bench-image-truncated": (["eval", "--tasks", "look_broken.jsonl", "--model", "model"], "truncated.png"),
    "bench-image-not-image": (["eval", "--tasks", "look_notimage.jsonl", "--model", "model"], "text.png"),
    "bench-not-utf8": (["eval", "--tasks", "look_latin1.jsonl", "--model", "model"], "not UTF-8"),
    "weights-truncated": (["prune", "--model", "model_truncated", "--method", "magnitude", "--out", "new"],
                          "model_truncated"),
    "weights-empty": (["prune", "--model", "model_empty", "--method", "magnitude", "--out", "new"], "model_empty"),
    "config-not-json": (["prune", "--model", "model_badconfig", "--method", "magnitude", "--out", "new"],
                        "model_badconfig"),
    "unknown-model-type": (["prune", "--model", "model_unknown", "--method", "magnitude", "--out", "new"],
                           "no-such-model"),
    "weights-missing": (["prune", "--model", "model_noweights", "--method", "magnitude", "--out", "new"],
                        "model_noweights"),
    "unknown-target": (PRUNE + ["--targets", "foo.bar", "--out", "new"], "foo.bar"),
    "negative-seed": (PRUNE + ["--seed", "-1", "--out", "new"], "seed"),
    "cuda-without-cuda": (PRUNE + ["--device", "cuda:0", "--out", "new"], "cuda:0"),
    "probe-batch-size-0": (["probe", "--model", "model", *STUDY[:-2], "--batch-size", "0", "--out", "new"],
                           "batch_size"),
    # 8. nonsense that used to be accepted
    "alpha-nan": (PRUNE[:-2] + ["--method", "atv", *CALIB, "--alpha", "nan", "--out", "new"], "--alpha"),
    "sparsity-inf": (PRUNE + ["--sparsity", "inf", "--out", "new"], "--sparsity"),
    "visual-ratio-ignored": (PRUNE[:-2] + ["--method", "wanda", *CALIB, "--visual-ratio", "0.3", "--out", "new"],
                             "visual_ratio"),
    "figures-from-nothing": (["figures", "--results", "userdata", "--out", "new"], "no figure"),
    "figures-out-under-a-file": (["figures", "--results", "figs", "--out", "afile/figures"], "is a file"),
    "figures-from-corrupt-records": (["figures", "--results", "figs", "--out", "new"], "corrupt result record"),
}

# a copy of the base folder with a finished study, changed as named, then resumed: refused naming the change
STUDY_CASES = {
    "resume-weights-changed": ("model weights", lambda root: _reweight(root / "model")),
    "resume-config-changed": ("model config.json", lambda root: _edit_json(root / "model" / "config.json",
                                                                            {"atv_note": 1})),
    "resume-benchmark-edited": ("benchmark look.jsonl", lambda root: _jsonl(root / "look.jsonl", _look()[::-1])),
    "resume-image-replaced": ("images of benchmark look.jsonl", lambda root: shutil.copy(
        root / "outside" / "secret.png", root / "calib" / "images" / "1.png")),
    "resume-calibration-edited": ("calibration file", lambda root: _edit_json(root / "calib" / "calib.json", None)),
    "corrupt-study-json": ("study.json", lambda root: (root / "study" / "study.json").write_text("{broken")),
    "corrupt-reference": ("fidelity_reference.pt", lambda root: (root / "study" / "fidelity_reference.pt")
                          .write_bytes(b"not a tensor file")),
    "corrupt-first-record": ("results.jsonl:1", lambda root: _corrupt_first_record(root / "study" / "results.jsonl")),
    "study-in-use": (f"in use by pid {os.getpid()}", lambda root: None),
}


def _reweight(model_dir: Path) -> None:
    model, _ = build_tiny("llava", seed=1)
    model.save_pretrained(model_dir)


def _edit_json(path: Path, extra: dict | None) -> None:
    data = json.loads(path.read_text())
    data = {**data, **extra} if extra else data[::-1]
    path.write_text(json.dumps(data))


def _corrupt_first_record(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text('{"cell": {"path\n' + "".join(lines[1:]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The base folder plus a finished study, a pruned model and a suite written by the toolkit (in this
    process: only the cases need processes of their own)."""
    from atv.cli import main

    tmp = tmp_path_factory.mktemp("bad_inputs")
    base = tmp / "base"
    _make_base(base)
    here = Path.cwd()
    os.chdir(base)
    try:
        codes = [main(["probe", "--model", "model", *STUDY, "--out", "study"]), main(PRUNE + ["--out", "pruned"]),
                 main(["suite", "--out", "suite", "--quick", "--n-calib", "2", "--n-eval", "2"])]
    finally:
        os.chdir(here)
    assert codes == [0, 0, 0]
    return tmp, base


@pytest.fixture(scope="module")
def outcomes(world):
    """Every case of the module, run in one batch."""
    tmp, base = world
    cases, names = [], []
    for name, (argv, _) in CASES.items():
        cases.append({"argv": argv, "cwd": str(base), "watch": str(base)})
        names.append(name)
    for name, (_, change) in STUDY_CASES.items():
        root = tmp / name
        shutil.copytree(base, root, symlinks=True)
        change(root)
        cases.append({"argv": ["probe", "--model", "model", *STUDY, "--out", "study"], "cwd": str(root),
                      "watch": str(root)})
        names.append(name)
    for what, argv in (("prune", PRUNE + ["--out", "pruned", "--overwrite"]),
                       ("suite", ["suite", "--out", "suite", "--quick", "--n-calib", "2", "--n-eval", "2",
                                  "--overwrite"])):
        for at in (1, 2):  # 1: before the old folder is set aside; 2: between setting it aside and renaming in
            root = tmp / f"kill-{what}-{at}"
            shutil.copytree(base, root, symlinks=True)
            cases.append({"argv": argv, "cwd": str(root), "kill_at_rename": at})
            names.append(f"kill-{what}-{at}")
    with study_lock(tmp / "study-in-use" / "study"):
        results = batch(cases, tmp / "run", base / "model")
    return dict(zip(names, results, strict=True))


KILLED = {"prune": ("pruned", PRUNE + ["--out", "pruned"]),
          "suite": ("suite", ["suite", "--out", "suite", "--quick", "--n-calib", "2", "--n-eval", "2"])}


@pytest.fixture(scope="module")
def next_runs(world, outcomes):
    """After the kills: an --overwrite run where the kill left a partial folder, a plain run where it left the
    old folder set aside (one batch for both commands)."""
    from cli_batch import tree

    tmp, base = world
    cases, left = [], {}
    for what, (name, argv) in KILLED.items():
        first, second = tmp / f"kill-{what}-1" / name, tmp / f"kill-{what}-2" / name
        left[what] = {"first": tree(first), "first_hidden": _hidden(first), "second_exists": second.exists(),
                      "second_hidden": _hidden(second)}
        cases += [{"argv": argv + ["--overwrite"], "cwd": str(first.parent)}, {"argv": argv, "cwd": str(second.parent)}]
    results = batch(cases, tmp / "again", base / "model")
    return {what: (left[what], results[2 * i: 2 * i + 2]) for i, what in enumerate(KILLED)}


def _assert_refused(result: dict, culprit: str) -> None:
    err = result["stderr"]
    assert result["code"] == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and culprit in errors[0], err[-3000:]
    assert result["changed"] == []


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(outcomes, name):
    _assert_refused(outcomes[name], CASES[name][1])


@pytest.mark.parametrize("name", list(STUDY_CASES))
def test_resume_refuses_changed_inputs_and_corrupt_studies(outcomes, name):
    _assert_refused(outcomes[name], STUDY_CASES[name][0])
    if name.startswith("resume-"):
        assert "new --out" in outcomes[name]["stderr"]


def test_a_failed_run_pins_no_study(world, outcomes):
    """`--batch-size 0` failed before any result: no study folder (so the corrected command is not refused)."""
    assert not (world[1] / "new").exists()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.mark.parametrize("what", ["prune", "suite"])
def test_killed_overwrite_loses_nothing_and_the_next_run_cleans_up(world, outcomes, next_runs, what):
    from cli_batch import tree

    tmp, base = world
    name = KILLED[what][0]
    original = tree(base / name)
    assert ".atv-toolkit" in original
    first, second = tmp / f"kill-{what}-1", tmp / f"kill-{what}-2"
    assert outcomes[f"kill-{what}-1"]["code"] == outcomes[f"kill-{what}-2"]["code"] == -9
    left, again = next_runs[what]
    # killed before the swap: the old folder intact, a complete partial one beside it
    assert left["first"] == original and [h.split("-")[0] for h in left["first_hidden"]] == [f".{name}.partial"]
    # killed between the two renames: no folder at --out, the old one set aside, the new one complete beside it
    assert not left["second_exists"]
    assert [h.split("-")[0] for h in left["second_hidden"]] == [f".{name}.old", f".{name}.partial"]
    assert again[0]["code"] == 0, again[0]["stderr"][-2000:]  # replaced, and the dead run's partial removed
    assert _hidden(first / name) == [] and ".atv-toolkit" in tree(first / name)
    assert again[1]["code"] == 2 and "is not empty" in again[1]["stderr"]  # the old folder put back, kept
    assert tree(second / name) == original and _hidden(second / name) == []


def test_output_folders_follow_the_umask(world):
    tmp, base = world
    mask = os.umask(0)
    os.umask(mask)
    for name in ("pruned", "suite"):
        assert (base / name).stat().st_mode & 0o777 == 0o777 & ~mask


def test_hostile_benchmark_file_name_runs_nothing(tmp_path, monkeypatch):
    """A file name holding Python (a triple quote, then __import__) never reaches generated source."""
    pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is not installed (the lmms extra)")
    from lmms_eval.tasks import get_task_dict

    from evaluation.lmms_bridge import task_manager, write_lmms_task
    from pruning.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    write_calibration(data, n=2)
    stem = 'q""";__import__("os").system("touch PWNED");\'\'\';__import__("os").system("touch PWNED2")#'
    bench = data / f"{stem}.jsonl"
    _jsonl(bench, _look("images/{i}.png"))
    with pytest.raises(ConfigError, match="only letters, digits"):  # the default name is atv_<stem>
        write_lmms_task(bench, tmp_path / "tasks")
    with pytest.raises(ConfigError, match="only letters, digits"):
        write_lmms_task(bench, tmp_path / "tasks", name='x"; import os')
    name = write_lmms_task(bench, tmp_path / "tasks", name="hostile")
    source = (tmp_path / "tasks" / "hostile_utils.py").read_text()
    assert "__import__" not in source and "PWNED" not in source
    task = get_task_dict([name], task_manager([tmp_path / "tasks"], include_defaults=False))[name]
    docs = list(task.test_docs())
    assert len(docs) == 2 and len(task.config.doc_to_visual(docs[0])) == 1  # the task reads its data and images
    assert not any(tmp_path.rglob("PWNED*"))


def test_a_dead_runs_lock_is_taken_over_and_a_live_runs_partial_kept(tmp_path):
    from pruning.outputs import recover_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = tmp_path / "study"
    study.mkdir()
    (study / ".atv-lock").write_text(json.dumps({"pid": dead.pid, "host": "here"}))
    with study_lock(study), study_lock(study):  # taken over (the OS lock died with its process); re-entrant
        assert json.loads((study / ".atv-lock").read_text())["pid"] == os.getpid()
    live = tmp_path / f".out.partial-{os.getpid()}-abc"
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    live.mkdir()
    stale.mkdir()
    recover_folder(tmp_path / "out")
    assert live.exists() and not stale.exists()


def test_eval_out_is_replaced_whole_or_not_at_all(tmp_path):
    from pruning.errors import OutputExistsError
    from pruning.outputs import check_output_file, write_text_atomic

    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(OutputExistsError, match="exists"):
        check_output_file(out)
    check_output_file(out, overwrite=True)
    write_text_atomic(out, "new")
    assert out.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": float("nan")}, "finite"),
    ({"method": "sparsegpt", "percdamp": float("inf")}, "finite"),
    ({"method": "wanda", "visual_ratio": 0.3}, "visual_ratio is used only"),
])
def test_prune_config_refuses_nonsense_from_python_too(kwargs, message):
    from pruning.config import PruneConfig
    from pruning.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        PruneConfig(**kwargs)


def test_a_failed_write_leaves_the_old_folder_and_nothing_hidden(tmp_path):
    from pruning.outputs import MARKER, atomic_folder

    out = tmp_path / "out"
    with atomic_folder(out, "test") as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_folder(out, "test") as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("the run failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "a.txt").read_text() == "first" and (out / MARKER).is_file()


def test_allow_outside_paths_accepts_what_the_default_refuses(world):
    from evaluation.benchmarks import BenchmarkError, load_benchmark

    _, base = world
    with pytest.raises(BenchmarkError, match="outside the benchmark"):
        load_benchmark(base / "look_absolute.jsonl")
    assert len(load_benchmark(base / "look_absolute.jsonl", allow_outside=True)) == 2
