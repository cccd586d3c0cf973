"""What the result files ``atv figures`` and ``atv compare`` read must hold, checked as they are read.

Result records (JSON Lines) must have a ``cell`` object and finite numbers wherever a number is read (a string,
null or NaN would end in a traceback or be printed as 'nan'); ``torch.save`` files are read with
``weights_only=True`` and must hold the dict their writer saves. Each refusal is one ToolkitError naming the
file or cell and what is wrong.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

from pruning.errors import ToolkitError

NUMBERS = ("mean_retention", "kl", "top1")          # top-level numbers of probe, method and map records
PER_BENCHMARK = ("scores", "retention")             # {benchmark: number}
NUMERIC_CELL = ("sparsity", "layer")                # cell values read as numbers


def is_dense(record: Mapping[str, Any]) -> bool:
    return "dense" in record["cell"].values()


def check_numbers(record: Mapping[str, Any], label: str) -> None:
    """Refuse a record (``label`` names it in the message) whose scores, retention, mean retention, KL, top-1,
    item scores or intervals are not finite numbers."""

    def damaged(what: str) -> ToolkitError:
        return ToolkitError(f"{label}: {what}; the result log is damaged: re-run that cell in a new --out")

    def number(where: str, value: Any, low: float = -math.inf, high: float = math.inf) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN too
            bounds = "" if math.isinf(low) else f" in [{low:g}, {high:g}]"
            raise damaged(f"{where} is {value!r}, not a finite number{bounds}")

    def table(key: str) -> dict:
        found = record.get(key)
        if found is not None and not isinstance(found, dict):
            raise damaged(f"{key!r} is {found!r}, not an object")
        return found or {}

    for key in NUMERIC_CELL:
        if key in record["cell"]:
            number(f"cell {key!r}", record["cell"][key])
    for key in NUMBERS:
        if key in record:
            number(key, record[key])
    for key in PER_BENCHMARK:
        for name, value in table(key).items():
            number(f"{key}[{name!r}]", value)
    for name, entry in table("items").items():
        scores = entry.get("scores") if isinstance(entry, dict) else None
        if not isinstance(scores, list) or not isinstance(entry.get("ids"), str):
            raise damaged(f"items[{name!r}] is not {{'ids': str, 'scores': [...]}}")
        for i, value in enumerate(scores):
            number(f"item score {i} of {name!r}", value, 0.0, 1.0)
    for key, found in table("intervals").items():  # [low, high] or {benchmark: [low, high] or None}
        for name, interval in (found.items() if isinstance(found, dict) else [(None, found)]):
            for value in interval if isinstance(interval, list) else ():
                number(f"intervals[{key!r}]" + ("" if name is None else f"[{name!r}]"), value)


def check_records(records: Sequence[Any], path: str | Path, cell_keys: Sequence[str], values: Sequence[str]
                  ) -> list[dict[str, Any]]:
    """``records`` of the log at ``path``, each an object with a ``cell`` object; every cell but the dense one
    holds ``cell_keys`` and its record ``values``; numbers are finite (:func:`check_numbers`)."""
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("cell"), dict):
            raise ToolkitError(f"{path}: record {n} has no 'cell' object; it is not a result record")
        if not is_dense(record):
            missing = [f"cell {k!r}" for k in cell_keys if k not in record["cell"]] + \
                [repr(k) for k in values if k not in record]
            if missing:
                raise ToolkitError(f"{path}: record {n} (cell {record['cell']}) lacks {', '.join(missing)}")
        check_numbers(record, f"{path}: record {n} (cell {record['cell']})")
    return list(records)


def load_saved(path: str | Path, keys: Sequence[str], writer: str) -> dict[str, Any]:
    """The dict ``torch.save``d at ``path`` by ``writer`` (read with ``weights_only=True``: tensors and plain
    containers only), holding ``keys``."""
    import torch

    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ToolkitError(f"{path} is not a file torch.load reads with weights_only=True "
                           f"({type(err).__name__}); write it with {writer}") from None
    if not isinstance(data, dict):
        raise ToolkitError(f"{path} holds a {type(data).__name__}, not the dict {writer} writes")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ToolkitError(f"{path} lacks {missing}; write it with {writer}")
    return data
