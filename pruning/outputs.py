"""Safe outputs: nothing a user owns is ever lost.

Rules, enforced before any work:

* an output (file or folder) is never the working folder, one of its ancestors, an input of the run, a
  folder that holds an input, nor a path inside an input folder;
* an existing, non-empty output folder is replaced (``overwrite``) only when this toolkit wrote it: every
  folder written through :func:`atomic_folder` carries a marker file, :data:`MARKER`;
* a folder is written beside its target (``.NAME.partial-PID-xxxx``) and swapped in by renames (the old
  one set aside as ``.NAME.old-PID-xxxx`` and deleted last). A run killed midway leaves such a sibling;
  the next run on the same target removes it, or, when the kill fell between the two renames (target
  missing, old copy present), puts the old folder back;
* nothing that appeared or changed in an output folder while a run wrote its replacement is deleted: the
  swap is refused and the new folder kept beside it (``NAME.new-xxxx``);
* a folder the toolkit writes into run after run (a study, the demo; marked by :func:`mark_folder`) is used
  only when it is new, empty or marked: no user's file in it is ever replaced or appended to;
* an output file is written to a temporary sibling and renamed over the target;
* a file an output folder holds and that a run opens in place (a result log, a lock) is never reached
  through a symbolic link (which could point out of the folder) and must be a regular file (opening a FIFO
  blocks): :func:`check_plain_file`, :func:`open_plain`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .errors import OutputExistsError, OutputWriteError

log = logging.getLogger(__name__)

MARKER = ".atv-toolkit"  # JSON {"written_by": "atv-toolkit", "kind": ...}: this toolkit wrote the folder
NO_ROOM = {errno.ENOSPC: "no space is left on the device", errno.EFBIG: "a file grew past the size limit",
           errno.EDQUOT: "the disk quota is used up", errno.EROFS: "the file system is read-only"}
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<role>partial|old)-(?P<pid>\d+)-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def owner() -> dict[str, Any]:
    """Who is writing: this process's id and host (for lock files and messages)."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_path(out: str | Path, inputs: Iterable[str | Path | None] = (), what: str = "--out") -> Path:
    """Refuse an output path that is the working folder or an ancestor of it, whose parent is a file, or
    that contains, equals or lies inside an input. Returns ``out``."""
    out = _check_place(out, what)
    _check_inputs(out, inputs, what)
    return out


def _check_place(out: str | Path, what: str) -> Path:
    out = Path(out)
    resolved = out.resolve()
    if _contains(resolved, Path.cwd().resolve()):
        raise OutputExistsError(f"{what} {str(out)!r} is the working folder or one of its parents; "
                                "choose a new folder for the output")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"{what} {str(out)!r} cannot be created: {str(parent)!r} is a file, "
                                        "not a folder")
            _check_writable(out, resolved if resolved.is_dir() else parent, what)
            break
    return out


def _check_writable(out: Path, folder: Path, what: str) -> None:
    """Refuse an output whose nearest existing folder ``folder`` this process cannot write in: tried (an empty
    hidden folder made and removed) rather than read from the permission bits, which a read-only file system
    or an administrator's rights make wrong."""
    try:
        Path(tempfile.mkdtemp(prefix=".atv-write-check-", dir=folder)).rmdir()
    except OSError as err:
        raise OutputExistsError(f"{what} {str(out)!r} cannot be written: {str(folder)!r} is not writable "
                                f"({err.strerror}); choose another {what}") from None


def _check_inputs(out: Path, inputs: Iterable[str | Path | None], what: str) -> None:
    resolved = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if _contains(resolved, source):
            raise OutputExistsError(f"{what} {str(out)!r} holds the input {str(given)!r}; writing there could "
                                    "destroy it: choose another output")
        if _contains(source, resolved):
            raise OutputExistsError(f"{what} {str(out)!r} is inside the input {str(given)!r}, which this run reads; "
                                    "it never writes there (whatever --overwrite says): choose an output outside it")


def written_by_toolkit(folder: str | Path, kind: str | None = None) -> bool:
    """Whether ``folder`` carries the marker :func:`atomic_folder` writes (of this ``kind``, when given)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
        return marker.get("written_by") == "atv-toolkit" and kind in (None, marker.get("kind"))
    except (OSError, ValueError, AttributeError):
        return False


def _write_marker(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "atv-toolkit", "kind": kind}), encoding="utf-8")


def mark_folder(folder: str | Path, kind: str) -> Path:
    """Create ``folder`` if needed and give it the toolkit's marker (``kind`` says what it holds): a folder
    the toolkit writes into run after run (a study, the demo) rather than swapping it in whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not written_by_toolkit(folder):
        _write_marker(folder, kind)
    return folder


def check_resumable_folder(out: str | Path, inputs: Iterable[str | Path | None] = (), what: str = "--out",
                           known: Iterable[str] = ()) -> Path:
    """Refuse (before any work) a folder that a resumable run (a study, the demo) would write into and that
    holds files this toolkit did not write: a missing or empty folder is fine, a non-empty one must carry the
    marker (:func:`mark_folder`) or one of the ``known`` files (relative paths that mark a folder of this kind
    written before folders were marked, e.g. a study's ``study.json``). Place and inputs are checked as by
    :func:`check_output_path`."""
    out = check_output_path(out, inputs, what)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{what} {str(out)!r} exists and is not a folder")
    if not out.is_dir() or written_by_toolkit(out) or any((out / name).exists() for name in known):
        return out
    names = sorted(p.name for p in out.iterdir())
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise OutputExistsError(f"{what} {str(out)!r} holds files atv-toolkit did not write ({shown}; no {MARKER} "
                                f"file in it), which this run could replace; choose a new or empty {what}")
    return out


def check_output_folder(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                        what: str = "--out") -> Path:
    """Refuse (before any work) an output folder this run may not write: see the module rules. An empty or
    missing folder is fine; a non-empty one needs ``overwrite`` and the toolkit's marker. Leftovers of a
    killed run are cleaned up first."""
    out = _check_place(out, what)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{what} {str(out)!r} exists and is not a folder")
    held = [name for name in _MODEL_FILES if (out / name).exists()]
    if held and not overwrite:
        raise OutputExistsError(f"{what} {str(out)!r} already holds a model ({', '.join(held)}); choose another "
                                f"{what} or pass --overwrite")
    _check_inputs(out, inputs, what)
    recover_folder(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{what} {str(out)!r} is not empty; choose another {what} or pass --overwrite "
                                    "(which replaces the whole folder)")
        if not written_by_toolkit(out):
            raise OutputExistsError(f"{what} {str(out)!r} was not written by atv-toolkit (no {MARKER} file in it), "
                                    "so --overwrite will not delete it; remove it yourself or choose another "
                                    f"{what}")
    return out


def recover_folder(out: str | Path) -> None:
    """Clean up what killed runs left beside ``out``: partial folders are removed; an old folder set aside
    is put back when ``out`` is missing (the kill fell between the two renames), else removed. Siblings
    of live processes are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for sibling in sorted(out.parent.iterdir()):
        match = _SIBLING.match(sibling.name)
        if not match or match["name"] != out.name or not sibling.is_dir() or pid_alive(int(match["pid"])):
            continue
        if match["role"] == "old" and not out.exists():
            sibling.rename(out)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


@contextlib.contextmanager
def scratch_folder(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A new hidden folder ``PREFIX<pid>-xxxx`` in ``parent`` for a run's working files (e.g. offloaded layers),
    removed at the end. A killed run cannot remove its own: those of dead processes are removed first (as
    :func:`recover_folder` removes the partial folders of killed runs)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    owned = re.compile(re.escape(prefix) + r"(?P<pid>\d+)-")
    unowned = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}$")  # earlier versions' names: no PID to check
    for entry in sorted(parent.iterdir()):
        match = owned.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
        elif unowned.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())
            log.warning("%s (%.1f MB) was left by a run of an earlier atv-toolkit version that was killed; it holds "
                        "only that run's working files, and its name does not say whether that run still works: "
                        "delete it when no such run is going on", entry, size / 2**20)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sibling(out: Path, role: str) -> Path:
    """A new, empty hidden folder beside ``out``, with the user's usual permissions (umask)."""
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.{role}-{os.getpid()}-", dir=out.parent))
    path.chmod(0o777 & ~_umask())
    return path


def folder_state(folder: str | Path) -> dict[str, tuple[int, int] | None]:
    """Relative path -> (size, mtime in ns) of every file under ``folder`` (None for a subfolder; empty when
    the folder is missing): what :func:`atomic_folder` compares to find what appeared or changed in its
    target while a run was writing."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    state: dict[str, tuple[int, int] | None] = {}
    for path in folder.rglob("*"):
        info = path.lstat()
        state[str(path.relative_to(folder))] = None if path.is_dir() and not path.is_symlink() else \
            (info.st_size, info.st_mtime_ns)
    return state


def _changed_since(since: Mapping[str, tuple[int, int] | None], out: Path) -> list[str]:
    """What is in ``out`` now that was not, or not so, in ``since`` (what vanished is not counted)."""
    now = folder_state(out)
    return sorted(name for name, value in now.items() if name not in since or since[name] != value)


@contextlib.contextmanager
def atomic_folder(out: str | Path, kind: str = "folder",
                  since: Mapping[str, tuple[int, int] | None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success it gets the toolkit's marker (``kind``
    says what it holds) and replaces ``out``: old set aside, new renamed in, old deleted. On any error the
    partial folder is removed and ``out`` is left as it was.

    ``since``: the :func:`folder_state` of ``out`` when the run started (default: on entering). When a file
    appeared or changed in ``out`` since then, nothing is replaced: the new folder is kept beside ``out``
    as ``NAME.new-xxxx`` and :class:`OutputExistsError` says where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out)
    since = folder_state(out) if since is None else since
    tmp = _sibling(out, "partial")
    old: Path | None = None
    changed: list[str] = []
    try:
        yield tmp
        _write_marker(tmp, kind)
        changed = _changed_since(since, out)
        if not changed:
            if out.exists():
                old = _sibling(out, "old")
                old.rmdir()
                out.rename(old)
            tmp.rename(out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            old.rename(out)
        if no_room(err) is not None:
            raise room_error(err, out, f"the partial output was removed and {str(out)!r} left as it was") from err
        raise
    if changed:
        kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.new-", dir=out.parent))
        kept.rmdir()
        tmp.rename(kept)  # a visible name: recover_folder never removes it
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise OutputExistsError(f"{str(out)!r} changed while this run was writing its replacement ({shown}), so "
                                f"nothing in it was replaced or deleted; the new output is in {str(kept)!r}: keep "
                                "what you need of the old folder, then move the new one into place")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def no_room(err: BaseException) -> int | None:
    """The errno of a write that failed for lack of room (:data:`NO_ROOM`), from an OSError or from a
    writer that reports it in its message (safetensors' "os error 28"); None for any other error."""
    if isinstance(err, OSError):
        return err.errno if err.errno in NO_ROOM else None
    found = re.search(r"os error (\d+)", str(err)) if type(err).__name__ == "SafetensorError" else None
    return int(found[1]) if found and int(found[1]) in NO_ROOM else None


def room_error(err: BaseException, path: str | Path, left: str) -> OutputWriteError:
    """One line for a write that failed for lack of room: what happened, where, what is left on disk."""
    code = no_room(err)
    return OutputWriteError(f"{NO_ROOM[code]} ({errno.errorcode[code]}) while writing {str(path)!r}; {left}: make "
                            "room (or write elsewhere) and run again")


@contextlib.contextmanager
def room_to_write(path: str | Path, left: str = "what was written before is kept") -> Iterator[None]:
    """Turn a write that fails for lack of room into one :class:`OutputWriteError` line."""
    try:
        yield
    except Exception as err:
        if no_room(err) is None:
            raise
        raise room_error(err, path, left) from err


def check_output_file(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                      what: str = "--out") -> Path:
    """Refuse (before any work) an output file that is a folder, equals an input, sits under a file, or
    exists without ``overwrite``."""
    out = check_output_path(out, inputs, what)
    if out.is_dir():
        raise OutputExistsError(f"{what} {str(out)!r} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{what} {str(out)!r} exists; choose another {what} or pass --overwrite")
    return out


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling of ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if no_room(err) is not None:
            raise room_error(err, path, f"{str(path)!r} was left as it was") from err
        raise
    return path


def _not_plain(path: Path, mode: int, what: str) -> OutputExistsError | None:
    """The refusal of a file whose ``lstat`` mode is ``mode``, or None for a regular file."""
    if stat.S_ISLNK(mode):
        return OutputExistsError(f"{str(path)!r} is a symbolic link, which atv-toolkit does not follow out of "
                                 f"{what}; remove the link or choose another {what}")
    if not stat.S_ISREG(mode):
        return OutputExistsError(f"{str(path)!r} is not a regular file (a FIFO, socket, device or folder); remove "
                                 f"it or choose another {what}")
    return None


def check_plain_file(path: str | Path, what: str = "--out") -> Path:
    """Refuse a file of an output folder that is a symbolic link (never followed: it may lead out of the
    folder) or anything but a regular file (opening a FIFO blocks); a missing one is fine. Returns ``path``."""
    path = Path(path)
    try:
        error = _not_plain(path, path.lstat().st_mode, what)
    except FileNotFoundError:
        return path
    if error is not None:
        raise error
    return path


def open_plain(path: str | Path, mode: str, what: str = "--out", **kwargs: Any):
    """``open(path, mode, **kwargs)`` of a file of an output folder, refused as :func:`check_plain_file`
    says, also when a link or a FIFO takes the file's place after the check: O_NOFOLLOW, and O_NONBLOCK so
    that opening a FIFO fails or returns at once (it changes nothing for a regular file)."""
    path = check_plain_file(path, what)

    def opener(name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)

    try:
        handle = open(path, mode, opener=opener, **kwargs)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO):  # a link, or a FIFO with no reader, swapped in
            check_plain_file(path, what)
        raise
    error = _not_plain(path, os.fstat(handle.fileno()).st_mode, what)
    if error is not None:
        handle.close()
        raise error
    return handle
