"""Reading JSON Lines files: the one reader behind calibration files, benchmarks and result logs.

Lines are read as a file reads them (split at ``"\\n"`` only, not at ``str.splitlines``' other breaks, which may
stand raw inside a JSON string); blank lines are skipped and lines are numbered from 1. What a caller makes of a
bad file (its error class, its wording, a torn last line it tolerates) stays with the caller: the reader raises
:class:`JsonLineError` and :func:`read_text` builds the caller's own error.

Example::

    text = read_text(path, lambda err: MyError(f"{path} is not UTF-8 text (byte {err.start})"))
    try:
        records = [record for _, record in json_lines(text)]
    except JsonLineError as err:
        raise MyError(f"{path}:{err.number}: not valid JSON ({err.msg})") from None
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator


class JsonLineError(Exception):
    """A line that is not JSON: ``number`` (from 1), ``msg``/``colno`` from the decoder (``too_deep``: nested past
    what the decoder can read)."""

    def __init__(self, number: int, msg: str, colno: int = 0, too_deep: bool = False):
        super().__init__(f"line {number}: {msg}")
        self.number, self.msg, self.colno, self.too_deep = number, msg, colno, too_deep


def read_text(path: str | Path, not_utf8: Callable[[UnicodeDecodeError], Exception]) -> str:
    """The UTF-8 text of ``path``; ``not_utf8(err)`` is raised (without the decode traceback) when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(err) from None


def json_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of every non-blank line of ``text``, in order.

    Raises JsonLineError at the first line that is not valid JSON (or nested too deeply to decode)."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise JsonLineError(number, err.msg, err.colno) from None
        except RecursionError:  # json's decoder recurses once per level of nesting
            raise JsonLineError(number, "nested too deeply", too_deep=True) from None
        yield number, value
