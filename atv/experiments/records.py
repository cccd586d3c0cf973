"""Resumable result logs: one JSON record per finished grid cell, appended and fsynced.

A study folder holds ``results.jsonl`` (the records) and ``study.json`` (the pinned setup). Opening a
log on a folder with another setup is refused; a record torn by a kill (the last line) is dropped,
so re-running the same command computes only the missing cells.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from pruning.errors import ToolkitError
from pruning.io import read_log

log = logging.getLogger(__name__)

RESULTS, SETUP = "results.jsonl", "study.json"


def cell_key(cell: Mapping[str, Any]) -> str:
    return json.dumps(dict(cell), sort_keys=True)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Finished cells of a results file (none when it does not exist yet); see :func:`pruning.io.read_log`."""
    return read_log(path) if Path(path).is_file() else []


class ResultLog:
    """The records of one study folder. ``setup`` must be JSON-serialisable."""

    def __init__(self, out_dir: str | Path, setup: Mapping[str, Any]):
        self.out_dir = Path(out_dir)
        self.setup = json.loads(json.dumps(dict(setup), default=str))
        self._pin_setup()
        self.path = self.out_dir / RESULTS
        self.records = read_records(self.path)
        self._drop_torn_tail()

    def _pin_setup(self) -> None:
        path = self.out_dir / SETUP
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved != self.setup:
                changed = sorted(k for k in set(saved) | set(self.setup) if saved.get(k) != self.setup.get(k))
                raise ToolkitError(f"{self.out_dir} holds a study with a different setup (differs in {changed}); "
                                   "re-run with the same arguments to resume, or choose another --out")
            return
        if (self.out_dir / RESULTS).exists():
            raise ToolkitError(f"{self.out_dir / RESULTS} exists without {SETUP}; choose another --out")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.setup, indent=2), encoding="utf-8")

    def _drop_torn_tail(self) -> None:
        """Cut the file back to its last complete line, so new records start on a line of their own."""
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def done(self, cell: Mapping[str, Any]) -> bool:
        key = cell_key(cell)
        return any(cell_key(r["cell"]) == key for r in self.records)

    def find(self, cell: Mapping[str, Any]) -> dict[str, Any] | None:
        key = cell_key(cell)
        return next((r for r in self.records if cell_key(r["cell"]) == key), None)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def ordered(self, cells: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The records of ``cells``, in that order (cells without a record are left out)."""
        return [r for r in (self.find(c) for c in cells) if r is not None]
