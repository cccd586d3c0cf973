"""Hostile runs: templates that never return, folders the toolkit did not write, mistakes found only after the
work, and what killed runs leave behind. Each is refused before any work with one line naming the culprit
(or, for leftovers, cleaned up by the next run).

The `atv` cases run as real processes through tests/cli_batch.py (one fork each, with a time limit: a hang
fails the case instead of the suite); the default model's cases run in this process on small fakes (the real
build needs a 93 MB download).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import _assert_refused, batch
from tiny_models import build_tiny
from tiny_processors import save_model_dir, write_calibration

from analysis.sensitivity import write_records

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['role'] }}"
ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
WANDA = ["prune", "--method", "wanda", "--calib", "calib/calib.json", "--images", "calib/images", "--nsamples", "1"]
PRUNE = ["prune", "--model", "model", "--method", "magnitude"]
PROBE_RECORDS = [{"cell": {"pathway": "dense"}, "scores": {"vqa": 50.0}, "mean_retention": 100.0}] + [
    {"cell": {"pathway": "text", "pool": "text", "sparsity": s}, "mean_retention": r, "retention": {"vqa": r},
     "scores": {"vqa": r / 2}} for s, r in ((0.5, 98.0), (0.6, 85.0))]

# name -> (argv, what the one error line must name); run in the base folder, which must stay byte-identical
CASES = {
    # 1. chat templates: bounded in time, sandbox refusals one line
    "template-loops-prune": (WANDA + ["--model", "model_loop", "--out", "new"], "did not finish within 10 s"),
    "template-loops-eval": (["eval", "--tasks", "look.jsonl", "--model", "model_loop"], "model_loop"),
    "template-escapes-prune": (WANDA + ["--model", "model_escape", "--out", "new"], "jinja sandbox refused"),
    "template-escapes-eval": (["eval", "--tasks", "look.jsonl", "--model", "model_escape"], "model_escape"),
    # 3. atv figures follows the output rules
    "figures-into-user-folder": (["figures", "--results", "figs", "--out", "userdata"], "did not write"),
    # 4. mistakes found before the work, not after it
    "out-not-writable": (PRUNE + ["--out", "/sys/atv-hostile-runs/pruned"], "not writable"),
    "push-to-hub-malformed": (PRUNE + ["--out", "new", "--push-to-hub", "not a repo!"], "'not a repo!'"),
    "private-without-push": (PRUNE + ["--out", "new", "--private"], "--private"),
}


def _jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A user's folder: a tiny model (and copies with hostile chat templates), calibration data, a benchmark,
    probe records and a folder of the user's own files."""
    import shutil

    base = tmp_path_factory.mktemp("hostile_runs") / "base"
    model, _ = build_tiny("llava")
    save_model_dir("llava", model, base / "model")
    for name, template in (("model_loop", LOOP), ("model_escape", ESCAPE)):
        shutil.copytree(base / "model", base / name)
        (base / name / "chat_template.jinja").write_text(template)
    write_calibration(base / "calib", n=2)
    _jsonl(base / "look.jsonl", [{"id": f"q{i}", "image": f"calib/images/{i}.png", "question": "what is shown",
                                  "options": ["cat", "dog"], "answer": "cat"} for i in range(2)])
    write_records(PROBE_RECORDS, base / "figs" / "probe" / "results.jsonl")
    (base / "userdata").mkdir()
    (base / "userdata" / "notes.txt").write_text("a user's own file")
    return base


@pytest.fixture(scope="module")
def outcomes(base):
    cases = [{"argv": argv, "cwd": str(base), "watch": str(base), "timeout": 60} for argv, _ in CASES.values()]
    return dict(zip(CASES, batch(cases, base.parent / "run", base / "model"), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_run_is_one_line_and_changes_nothing(outcomes, name):
    if name == "out-not-writable" and not Path("/sys").is_dir():
        pytest.skip("needs /sys (a folder nobody may create folders in, not even root)")
    _assert_refused(outcomes[name], CASES[name][1])


def test_a_killed_offload_runs_folder_is_removed_by_the_next_run(base):
    """A dead process's .atv-offload-PID-xxxx is removed; a live one's (this test's) is kept."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = base.parent / "offload"
    root.mkdir()
    stale, live = root / f".atv-offload-{dead.pid}-abc", root / f".atv-offload-{os.getpid()}-abc"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "layer.safetensors").write_bytes(b"left by a run")
    argv = ["prune", "--model", str(base / "model"), "--method", "magnitude", "--offload", "--out", "pruned"]
    [result] = batch([{"argv": argv, "cwd": str(root), "timeout": 300}], root / "run", base / "model")
    assert result["code"] == 0, result["stderr"][-3000:]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".atv-offload-")) == [live.name]


# -- the demo: refused before it builds anything -----------------------------------------------------------
def _no_build(*args, **kwargs):
    raise AssertionError("the demo started its work before checking its arguments")


@pytest.mark.parametrize("field", ["nsamples", "n_eval"])
def test_demo_refuses_zero_sizes(field):
    from atv.experiments.demo import DemoConfig
    from pruning.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{field}=0: must be >= 1"):
        DemoConfig(**{field: 0})


def test_demo_checks_its_allocation_map_first(tmp_path, monkeypatch):
    import atv.default_model
    from atv.experiments.demo import DemoConfig, run_demo
    from pruning.errors import ConfigError

    monkeypatch.setattr(atv.default_model, "build_default_model", _no_build)
    missing = tmp_path / "no-map"
    with pytest.raises(ConfigError, match="cannot read the sensitivity map"):
        run_demo(DemoConfig(out=tmp_path / "demo", allocation_map=missing, cache_dir=tmp_path / "cache"))


# -- the default model: only the toolkit's own build is reused or replaced ---------------------------------
def _error_line(capsys) -> str:
    """The one error line a refused command printed (progress bars aside), asserting there is one."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def _fail_fetch(*args, **kwargs):
    raise AssertionError("the build started before refusing its cache folder")


@pytest.mark.parametrize("force", [False, True])
def test_default_model_never_takes_a_users_smol_llava(tmp_path, monkeypatch, capsys, force):
    from atv import default_model as dm
    from atv.cli import main

    monkeypatch.setattr(dm, "read_parts", _fail_fetch)
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "dm" / dm.MODEL_NAME
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("a user's own model")
    before = sorted((p.name, p.read_bytes()) for p in mine.iterdir())
    assert main(["default-model", "build", "--cache-dir", "dm"] + (["--force"] if force else [])) == 2
    assert "not a smol-llava build of atv-toolkit" in _error_line(capsys)
    assert sorted((p.name, p.read_bytes()) for p in mine.iterdir()) == before


def test_default_model_reuses_only_its_marked_build(tmp_path, monkeypatch):
    from atv import default_model as dm
    from pruning.errors import OutputExistsError
    from pruning.outputs import mark_folder

    monkeypatch.setattr(dm, "read_parts", _fail_fetch)
    other = tmp_path / "other" / dm.MODEL_NAME
    mark_folder(other, "demo")  # the toolkit's marker, but not of a default-model build
    (other / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="not a smol-llava build"):
        dm.build_default_model(tmp_path / "other")
    built = tmp_path / "built" / dm.MODEL_NAME
    mark_folder(built, dm.BUILD_KIND)
    (built / "config.json").write_text("{}")
    assert dm.build_default_model(tmp_path / "built") == built


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_default_model_cache_dir_that_is_a_file(tmp_path, monkeypatch, capsys, where):
    from atv import default_model as dm
    from atv.cli import main

    monkeypatch.setattr(dm, "read_parts", _fail_fetch)
    (tmp_path / "afile").write_text("not a folder")
    cache = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "cache"
    assert main(["default-model", "build", "--cache-dir", str(cache)]) == 2
    assert "is a file, not a folder" in _error_line(capsys)


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"GGUF\x03\x00\x00\x00\x05"])
def test_default_model_corrupt_gguf(tmp_path, monkeypatch, capsys, content):
    from atv import default_model as dm
    from atv.cli import main

    gguf = tmp_path / "cache" / "smollm2" / dm.GGUF_NAME
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(content)
    assert main(["default-model", "build", "--cache-dir", str(tmp_path / "cache")]) == 2
    line = _error_line(capsys)
    assert "cannot be read" in line and dm.GGUF_NAME in line
