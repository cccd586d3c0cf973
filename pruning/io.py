"""Loading models and saving pruned ones (atomically: a failed run leaves no half-written model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .adapters import get_adapter
from .errors import ToolkitError, UnsupportedModelError
from .outputs import atomic_folder, check_output_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse (before any work) an output folder this run may not write (see :mod:`pruning.outputs`): one
    that holds an input or the working folder, or a non-empty one without ``overwrite`` or not written by
    this toolkit."""
    return check_output_folder(out_dir, overwrite, inputs)


def load_model(model_dir: str | Path, dtype: str = "float32", device: str | None = None,
               with_processor: bool = True, offload_folder: str | Path | None = None) -> tuple[nn.Module, Any]:
    """Load an HF vision-language model and (unless ``with_processor=False``) its processor from a local folder.

    With ``offload_folder``, the decoder layers stay on disk (read memory-mapped from the checkpoint's
    safetensors by accelerate's hooks, one layer at a time; pruned weights are written to the folder)
    and the other modules load on ``device`` (default CPU)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UnsupportedModelError(f"{str(model_dir)!r} is not a model folder (no config.json)")
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_device(device)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as err:
        raise UnsupportedModelError(f"cannot read the config.json of {str(model_dir)!r}: {_one_line(err)}; fix it or "
                                    "re-save the model with save_pretrained") from None
    placement = {} if offload_folder is None else _disk_offload(config, device, offload_folder)
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPES[dtype], **placement)
    except ValueError as err:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} in {str(model_dir)!r} is not an image-text-to-text "
            f"architecture transformers knows ({_one_line(err)})") from None
    except (OSError, SafetensorError) as err:
        raise UnsupportedModelError(f"cannot read the weights in {str(model_dir)!r} (missing, truncated or corrupt: "
                                    f"{_one_line(err)}); re-save or re-download the model") from None
    get_adapter(model)  # raises UnsupportedModelError with the candidates it saw
    if device is not None and offload_folder is None:
        model.to(device)
    if not with_processor:
        return model.eval(), None
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except (AttributeError, ImportError, ValueError, OSError) as err:
        raise UnsupportedModelError(
            f"cannot load the processor saved in {str(model_dir)!r} ({type(err).__name__}: {err}). Some transformers "
            "processors (e.g. Qwen2-VL's video processor) need torchvision: install the torchvision build that "
            "matches your torch") from None
    return model.eval(), processor


def _one_line(err: BaseException) -> str:
    """An exception's message on one line, cut to a readable length."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def check_device(device: str | None) -> None:
    """Refuse (before loading) a device string torch cannot parse or this machine does not have."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UnsupportedModelError(f"device {device!r} is not a torch device ({_one_line(err)}); e.g. cpu or "
                                    "cuda:0") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise UnsupportedModelError(f"device {device!r} is not available: this torch sees "
                                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA "
                                    "device(s); pass --device cpu or a present GPU")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedModelError(f"device {device!r} is not available on this machine; pass --device cpu")


def _disk_offload(config, device: str | None, offload_folder: str | Path) -> dict[str, Any]:
    """from_pretrained arguments keeping the decoder layers on disk (module names found on a meta copy)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    from .offload import offload_device_map

    with init_empty_weights():
        skeleton = AutoModelForImageTextToText.from_config(config)
    device_map = offload_device_map(skeleton, get_adapter(skeleton).decoder_layers(skeleton), device or "cpu")
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    return {"device_map": device_map, "offload_folder": str(offload_folder)}


def save_pruned(model: nn.Module, processor: Any, report: dict[str, Any], out_dir: str | Path,
                overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """save_pretrained (safetensors) + processor + ``prune_report.json``, written to a temporary
    sibling folder and moved into place only when complete."""
    out = check_output_dir(out_dir, overwrite, inputs)  # an existing folder is empty, or overwrite was asked for
    with atomic_folder(out, "pruned-model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    log.info("saved pruned model to %s", out)
    return out


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of an append-only JSON Lines log (blank lines skipped); a torn last line, left by a run
    killed mid-write, is dropped with a warning, while a corrupt line before it is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ToolkitError(f"{path}: corrupt result log (not UTF-8 text); use a new --out") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number != len(lines):  # a finished line (a kill tears only the unterminated last one)
                raise ToolkitError(f"{path}:{number}: corrupt result record; delete the line or use a new --out")
            log.warning("%s: dropping an unfinished last record", path)
            continue
        records.append(record)
    return records
