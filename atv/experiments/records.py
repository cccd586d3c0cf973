"""Resumable result logs: one JSON record per finished grid cell, appended and fsynced.

A study folder holds ``results.jsonl`` (the records) and ``study.json`` (the pinned setup, with content
fingerprints of the inputs: model config and weights, calibration file, benchmark files and their
images). Opening a log on a folder with another setup, or whose inputs changed, is refused naming what
changed; a record torn by a kill (the last line) is dropped, so re-running the same command computes only
the missing cells. One run at a time holds a study folder (:func:`study_lock`); a new or empty one gets the
toolkit's marker, and a non-empty folder without it is never written into (:func:`check_study_folder`).

A shard of the grid (``--shard i/n``, e.g. one job of a Slurm array) writes its own file
``records.shard-i-of-n.jsonl`` and holds its own lock, so the n shards may run at once in one folder. A
shard's lines are *measurements*: records without retention (the dense cell may be in another shard), each
carrying the fingerprints of the setup and inputs it was measured under (``study``). A run on the whole log
(a rerun, ``--merge``) reads every shard file and appends their cells to ``results.jsonl`` as complete
records; ``results.jsonl`` has one writer at a time. A shard file with a measurement of another setup (a
shard run with another model, a file copied in from another study) is refused, naming the file and what
differs; so is a ``study.json`` without its fingerprints, when this run has some to compare.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pruning.errors import ConfigError, ToolkitError
from pruning.io import read_log, seal_log
from pruning.outputs import (
    MARKER,
    check_plain_file,
    check_resumable_folder,
    mark_folder,
    no_room,
    open_plain,
    owner,
    room_error,
    write_text_atomic,
)

log = logging.getLogger(__name__)

RESULTS, SETUP = "results.jsonl", "study.json"
_PART = re.compile(r"records\.shard-(\d+)-of-(\d+)\.jsonl")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): the cells at positions p with p % count == index - 1."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ConfigError(f"--shard must be I/N with 1 <= I <= N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        """'2/4' -> Shard(2, 4); anything else is refused naming the form."""
        index, sep, count = str(spec).partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ConfigError(f"--shard must be I/N (e.g. 2/4: the second of four shards), got {spec!r}")
        return cls(int(index), int(count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def file(self) -> str:
        """This shard's records file, next to ``results.jsonl``."""
        return f"records.shard-{self.index}-of-{self.count}.jsonl"

    def holds(self, position: int) -> bool:
        return position % self.count == self.index - 1


def part_files(out_dir: str | Path) -> list[Path]:
    """The shard records files of a study folder, in name order."""
    folder = Path(out_dir)
    return sorted(p for p in folder.glob("records.shard-*-of-*.jsonl") if _PART.fullmatch(p.name)) \
        if folder.is_dir() else []


def cell_key(cell: Mapping[str, Any]) -> str:
    return json.dumps(dict(cell), sort_keys=True)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Finished cells of a results file (none when it does not exist yet); see :func:`pruning.io.read_log`."""
    records = read_log(path) if Path(path).is_file() else []
    bad = next((i for i, r in enumerate(records, 1) if not isinstance(r.get("cell"), dict)), None)
    if bad is not None:
        raise ToolkitError(f"{path}: record {bad} has no 'cell'; it is not a result record: use a new --out")
    return records


# -- fingerprints of the inputs ------------------------------------------------------------------------
_WHOLE_FILE = 64 << 20  # files up to this size are hashed whole; larger ones by header, size and samples
_SAMPLES, _SAMPLE = 32, 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str | Path) -> str:
    """A weights file's fingerprint: whole-file sha256 up to 64 MiB; beyond, its size, its safetensors header
    (names, dtypes, shapes, offsets) and 32 evenly spaced 1 MiB samples (a full hash of a large checkpoint
    would cost minutes on every resume)."""
    path = Path(path)
    size = path.stat().st_size
    if size <= _WHOLE_FILE:
        return file_digest(path)
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            length = struct.unpack("<Q", f.read(8))[0]
            digest.update(f.read(min(length, size)))
        for i in range(_SAMPLES):
            f.seek((size - _SAMPLE) * i // (_SAMPLES - 1))
            digest.update(f.read(_SAMPLE))
    return "sampled:" + digest.hexdigest()


def model_inputs(model_dir: str | Path) -> dict[str, str]:
    """Fingerprints of a model folder: its config.json and its weight files."""
    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    digest = hashlib.sha256()
    for path in weights:
        digest.update(f"{path.name}:{weights_digest(path)};".encode())
    config = model_dir / "config.json"
    return {"model config.json": file_digest(config) if config.is_file() else "missing",
            "model weights": digest.hexdigest() if weights else "missing"}


def changed_inputs(saved: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """The inputs whose fingerprint differs (or that one side lacks)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def read_setup(out_dir: str | Path) -> dict[str, Any] | None:
    """A study folder's pinned setup (None when there is none); a corrupt file is an error naming it."""
    path = Path(out_dir) / SETUP
    if not path.is_file():
        return None
    try:
        setup = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ToolkitError(f"{path} is corrupt ({err}); this study folder cannot be resumed: choose another --out") \
            from None
    if not isinstance(setup, dict):
        raise ToolkitError(f"{path} is corrupt (not a JSON object); this study folder cannot be resumed: choose "
                           "another --out")
    return setup


def inputs_changed(out_dir: str | Path, inputs: Mapping[str, str], subset: bool = False,
                   remedy: str = "pass a new --out to start a new study") -> list[str]:
    """The inputs whose fingerprint differs from the one the study in ``out_dir`` pinned (none without a
    study.json); with ``subset``, only those of ``inputs`` the study pinned are compared. A setup without its
    fingerprints (or with garbled ones) cannot be verified against ``inputs``: refused."""
    saved = read_setup(out_dir)
    if saved is None:
        return []
    pinned = saved.get("inputs")
    if not (isinstance(pinned, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in pinned.items())):
        if not inputs:
            return []  # a study run from Python without fingerprints, checked against none
        state = "has no 'inputs' entry" if pinned is None else "has a garbled 'inputs' entry"
        raise ToolkitError(f"{Path(out_dir) / SETUP} {state} (the fingerprints of the model, calibration and "
                           f"benchmark files): its records cannot be verified against this run's inputs; {remedy}")
    if subset:
        inputs = {k: v for k, v in inputs.items() if k in pinned}
        pinned = {k: v for k, v in pinned.items() if k in inputs}
    return changed_inputs(pinned, inputs)


def setup_prints(setup: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What a result computed under ``setup`` carries of it, to be matched later: a short fingerprint of each
    setup entry, and the inputs' fingerprints as they are."""
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    inputs = setup.get("inputs")
    return {"setup": {k: digest(v) for k, v in setup.items() if k != "inputs"},
            "inputs": dict(inputs) if isinstance(inputs, dict) else {"inputs": digest(inputs)}}


def prints_differ(carried: Any, prints: Mapping[str, Any]) -> list[str] | None:
    """The setup entries and inputs in which ``carried`` differs from ``prints`` (both :func:`setup_prints`);
    None when ``carried`` is not such a fingerprint at all."""
    if not (isinstance(carried, dict) and isinstance(carried.get("setup"), dict)
            and isinstance(carried.get("inputs"), dict)):
        return None
    return changed_inputs(carried["setup"], prints["setup"]) + changed_inputs(carried["inputs"], prints["inputs"])


def check_inputs(out_dir: str | Path, inputs: Mapping[str, str]) -> None:
    """Refuse to resume a study whose inputs (fingerprinted) changed since its records were computed, or whose
    fingerprints are missing (see :func:`inputs_changed`)."""
    changed = inputs_changed(out_dir, inputs)
    if changed:
        raise ToolkitError(f"input changed since the study in {out_dir} started: {', '.join(changed)}; its records "
                           "were computed on the old input(s). Restore them to resume, or pass a new --out to start "
                           "a new study")


def check_study_folder(out_dir: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse (before any work) a study folder this run may not write into: one holding or inside an input,
    or a non-empty folder this toolkit did not write (no marker, and no ``study.json`` of a study written
    before folders were marked): a run writes study.json, results.jsonl, recipe.yaml and tables there."""
    return check_resumable_folder(out_dir, inputs, known=(SETUP,))


# -- the study lock -------------------------------------------------------------------------------------
LOCK = ".atv-lock"
_held: dict[tuple[Path, str], Any] = {}  # (study folder, lock name) -> open lock file: re-entrant in a process


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"pid {who['pid']} on host {who['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def study_lock(out_dir: str | Path, shard: Shard | None = None) -> Iterator[None]:
    """Hold the study folder exclusively (an OS lock on ``OUT/.atv-lock``, released by the OS when the process
    dies, so a dead run's lock is simply taken over); the file names the holder while it is held. A folder
    this call created and that holds only the lock when it is released is removed again. A ``shard`` holds
    its own lock (``OUT/.atv-lock.shard-i-of-n``): shards of one grid run side by side."""
    lock = LOCK if shard is None else f"{LOCK}.shard-{shard.index}-of-{shard.count}"
    out = Path(out_dir).resolve()
    if (out, lock) in _held:
        yield
        return
    created = not out.exists()
    fresh = created or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    handle = open_plain(out / lock, "a+", encoding="utf-8")  # never through a link: it is truncated below
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _holder(handle.read())
        handle.close()
        what = "the study folder" if shard is None else f"shard {shard} of the study folder"
        raise ToolkitError(f"{what} {out_dir} is in use by {holder}; wait for that run to finish or choose "
                           "another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(owner()))
    handle.flush()
    if fresh:
        mark_folder(out, "study")  # the toolkit's from now on (see check_study_folder)
    _held[out, lock] = handle
    try:
        yield
    finally:
        del _held[out, lock]
        handle.seek(0)
        handle.truncate()  # a free lock names nobody (and a failed run leaves the file as it found it)
        if created and {p.name for p in out.iterdir()} <= {lock, MARKER}:
            shutil.rmtree(out, ignore_errors=True)
        handle.close()


# -- the log --------------------------------------------------------------------------------------------
class ResultLog:
    """The records of one study folder. ``setup`` must be JSON-serialisable; its ``inputs`` entry (label ->
    fingerprint) names what the records were computed on.

    The setup is checked at once but written (``study.json``) only when the first result is: a run that
    fails before computing anything pins nothing, so the corrected command is not refused.

    ``records``: the complete records of ``results.jsonl``; ``measured``: cell key -> measurement, from
    every shard file. With a ``shard``, :meth:`append` writes measurements to that shard's file; without,
    complete records to ``results.jsonl``."""

    def __init__(self, out_dir: str | Path, setup: Mapping[str, Any], shard: Shard | None = None):
        self.out_dir = Path(out_dir)
        self.setup = json.loads(json.dumps(dict(setup), default=str))
        self.shard = shard
        self.path = self.out_dir / (RESULTS if shard is None else shard.file)
        for path in (self.out_dir / RESULTS, self.path, *part_files(self.out_dir)):
            check_plain_file(path)  # before anything is read or written: no link out of the folder, no FIFO
        self.records = read_records(self.out_dir / RESULTS)
        self.prints = setup_prints(self.setup)  # what each measurement in a shard's file carries
        parts = {part: read_records(part) for part in part_files(self.out_dir)}
        self.measured: dict[str, dict[str, Any]] = {}
        for measurements in parts.values():
            for record in measurements:
                self.measured.setdefault(cell_key(record["cell"]), record)
        self._pinned = self._check_setup()
        for part, measurements in parts.items():
            self._check_part(part, measurements)
        self._drop_torn_tail()

    def _computed(self) -> bool:
        return bool(self.records) or bool(self.measured) or any(self.out_dir.glob("*.pt"))

    def _check_setup(self) -> bool:
        """Whether the folder's pinned setup is this one (raises when it differs and results exist)."""
        saved = read_setup(self.out_dir)
        if saved is None:
            if self.records:
                raise ToolkitError(f"{self.path} exists without {SETUP}; choose another --out")
            return False
        if saved == self.setup:
            return True
        if not self._computed():
            return False  # nothing was computed under the old setup: this one replaces it
        check_inputs(self.out_dir, self.setup.get("inputs", {}))
        differs = sorted(k for k in set(saved) | set(self.setup)
                         if k != "inputs" and saved.get(k) != self.setup.get(k))
        if differs:
            raise ToolkitError(f"{self.out_dir} holds a study with a different setup (differs in {differs}); "
                               "re-run with the same arguments to resume, or choose another --out")
        return True  # the same study (a setup without fingerprints is refused above when this run has some)

    def _check_part(self, part: Path, measurements: list[dict[str, Any]]) -> None:
        """Refuse a shard file with a measurement of another setup or inputs (a shard run with other options or
        another model, a file copied in from another study): it would be merged into this study's table."""
        for i, record in enumerate(measurements, 1):
            differs = prints_differ(record.get("study"), self.prints)
            if differs is None:
                raise ToolkitError(f"{part}: record {i} carries no fingerprint of its study's setup (a shard file of "
                                   "an older version or not written by atv); its cells cannot be verified: move it "
                                   "out of the folder and re-run that shard")
            if differs:
                raise ToolkitError(f"{part}: record {i} was measured with another setup or inputs (differs in "
                                   f"{', '.join(differs)}) than the study in {self.out_dir}: move it out of the "
                                   "folder, or re-run that shard with this study's options and inputs")

    def pin(self) -> None:
        """Write ``study.json`` (once), before the first result this setup produces."""
        if not self._pinned:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / SETUP, json.dumps(self.setup, indent=2))
            self._pinned = True

    def _drop_torn_tail(self) -> None:
        """End the file on a line boundary (see :func:`pruning.io.seal_log`), so new records start on a line
        of their own and no complete record is lost."""
        seal_log(check_plain_file(self.path))

    def done(self, cell: Mapping[str, Any]) -> bool:
        """Whether the cell has a record, or a measurement in a shard file."""
        key = cell_key(cell)
        return key in self.measured or any(cell_key(r["cell"]) == key for r in self.records)

    def find(self, cell: Mapping[str, Any]) -> dict[str, Any] | None:
        key = cell_key(cell)
        return next((r for r in self.records if cell_key(r["cell"]) == key), None)

    def append(self, record: dict[str, Any]) -> None:
        """Append a complete record to ``results.jsonl`` (a measurement to the shard's file), fsynced."""
        self.pin()
        if self.shard is not None:
            record = {**record, "study": self.prints}  # checked when the shards are merged
        line = (json.dumps(record) + "\n").encode("utf-8")
        with open_plain(self.path, "ab", buffering=0) as f:  # unbuffered: a failed write leaves nothing to flush
            size = os.fstat(f.fileno()).st_size
            try:
                written = 0
                while written < len(line):
                    written += f.write(line[written:])
                os.fsync(f.fileno())
            except OSError as err:  # no torn record is left behind: the log ends with its last complete one
                os.ftruncate(f.fileno(), size)
                if no_room(err) is None:
                    raise
                raise room_error(err, self.path, "the records before this one are kept and the study resumes "
                                                 "from them") from err
        if self.shard is None:
            self.records.append(record)
        else:
            self.measured.setdefault(cell_key(record["cell"]), record)

    def ordered(self, cells: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The records of ``cells``, in that order (cells without a record are left out)."""
        return [r for r in (self.find(c) for c in cells) if r is not None]
