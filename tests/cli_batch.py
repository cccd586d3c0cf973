"""Run many `atv` command lines as separate processes, paying the import of torch and transformers once.

``python tests/cli_batch.py CASES.json RESULTS.json [MODEL_DIR]``: the parent imports ``atv.cli`` (and the
modules its commands use) once, and with MODEL_DIR resolves that model's config, class and processor
(transformers imports them lazily, seconds each; no tensor is computed before a fork), then forks one
child per case; the child changes into the case's ``cwd`` and runs
``python -m atv.cli ARGV`` as the interpreter would (uncaught exception: traceback on stderr, exit 1;
SystemExit: its code). A case may set ``timeout: SECONDS`` (a child still running then is killed, code
``-9``) and ``kill_at_rename: N``: the child SIGKILLs itself on its Nth call
of ``Path.rename`` (a kill at an exact point of a folder swap). For each case the parent records the exit
code (``-9`` for a kill), stdout, stderr, and the files under ``watch`` whose bytes changed, appeared or
vanished, and the seconds it took.
"""

import hashlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path


def tree(root: str | None) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (hidden ones included)."""
    if root is None or not Path(root).exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _child(case: dict, out: str, err: str) -> None:
    os.chdir(case["cwd"])
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    if case.get("kill_at_rename"):
        calls, rename = [0], Path.rename

        def killing_rename(self, target):
            calls[0] += 1
            if calls[0] == case["kill_at_rename"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(self, target)

        Path.rename = killing_rename
    from atv.cli import main

    code = 1
    try:
        code = main(case["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter: print the traceback, exit 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm(model_dir: str) -> None:
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(AutoConfig.from_pretrained(model_dir))]
    AutoProcessor.from_pretrained(model_dir)


def _wait(pid: int, timeout: float | None) -> int:
    """The child's wait status; with ``timeout`` (seconds) a child still running then is SIGKILLed (code -9)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.05)


def run(cases: list[dict], scratch: Path, warm: str | None = None) -> list[dict]:
    import atv.cli  # noqa: F401 - imported once, before the forks
    import atv.experiments.eval_job  # noqa: F401
    import atv.experiments.probe_study  # noqa: F401
    import atv.experiments.prune_job  # noqa: F401
    import atv.suite  # noqa: F401

    if warm is not None:
        _warm(warm)

    results = []
    for number, case in enumerate(cases):
        start = time.perf_counter()
        before = tree(case.get("watch"))
        out, err = scratch / f"{number}.out", scratch / f"{number}.err"
        pid = os.fork()
        if pid == 0:
            _child(case, str(out), str(err))
        status = _wait(pid, case.get("timeout"))
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        after = tree(case.get("watch"))
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        results.append({"code": code, "stdout": out.read_text(errors="replace"),
                        "stderr": err.read_text(errors="replace"), "changed": changed,
                        "seconds": round(time.perf_counter() - start, 2)})
    return results


if __name__ == "__main__":
    cases_file, results_file = Path(sys.argv[1]), Path(sys.argv[2])
    results = run(json.loads(cases_file.read_text()), results_file.parent, sys.argv[3] if len(sys.argv) > 3 else None)
    results_file.write_text(json.dumps(results))
