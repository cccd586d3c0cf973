"""`atv probe` from the command line: a real SIGKILL mid-grid, resume, and bad input before any work."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_studies import study_files

from atv.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made = study_files(tmp_path_factory.mktemp("probe"))
    return made.tmp, [*made.args(made.bench), "--sparsities", "0.5", "0.6"]


def _cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "atv.cli", "probe", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_killed_study_resumes_to_the_same_table(files):
    tmp, args = files
    full = _cli([*args, "--out", str(tmp / "full")])
    assert full.wait(timeout=300) == 0, full.stderr.read()
    killed = _cli([*args, "--out", str(tmp / "cut")])
    results = tmp / "cut" / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 4):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done_before = len(results.read_text().splitlines())
    assert 4 <= done_before < 13
    resumed = _cli([*args, "--out", str(tmp / "cut")])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{13 - done_before} cells computed, {done_before} resumed" in out
    assert (tmp / "cut" / "probe_table.md").read_text() == (tmp / "full" / "probe_table.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--pools", "pixels"], "unknown probe pool 'pixels'"),
    (["--pathways", "audio"], "unknown pathway"),
    (["--sparsities", "1.5"], "sparsities must be in (0, 1)"),
])
def test_bad_grid_is_refused_before_work(files, capsys, extra, message):
    tmp, args = files
    out = tmp / "never"
    assert main(["probe", *args, *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_malformed_benchmark_line_is_named_before_work(files, capsys):
    tmp, args = files
    bad = tmp / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "options": ["x"], "answer": "x"}\n{"id": "b", "question": \n')
    args = list(args)
    args[args.index("--bench") + 1] = str(bad)
    assert main(["probe", *args, "--out", str(tmp / "never2")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and ":2" in err
    assert not (tmp / "never2").exists()
