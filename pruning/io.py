"""Loading models and saving pruned ones (atomically: a failed run leaves no half-written model)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .adapters import get_adapter
from .errors import ConfigError, ToolkitError, UnsupportedModelError, one_line
from .jsonlines import JsonLineError, json_lines, read_text
from .offload import save_shard_size
from .options import check_fields, option, parse_device
from .outputs import atomic_folder, check_output_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Deprecated alias of :func:`pruning.outputs.check_output_folder`."""
    warnings.warn("pruning.io.check_output_dir is deprecated; use pruning.outputs.check_output_folder",
                  DeprecationWarning, stacklevel=2)
    return check_output_folder(out_dir, overwrite, inputs)


@dataclass
class LoadOptions:
    """How a model is found and placed: shared by ``atv prune``, ``atv probe`` and ``atv eval``.

    Args:
        revision: Hub branch, tag or commit, with a Hub id as the model.
        trust_remote_code: run Python code shipped with the model repository (only for repositories you trust).
        dtype: dtype in memory; ``auto`` = the checkpoint's own (statistics stay fp32).
        device: device to run on, e.g. ``cpu`` or ``cuda:0`` (default: where the model loads).
        device_map: accelerate dispatch over the devices (``auto``, ``balanced``, ...).
        max_memory: caps for ``device_map``, e.g. ``("0=20GiB", "1=20GiB", "cpu=60GiB")``.
    """

    revision: str | None = option(None, "Hub branch, tag or commit, with a Hub id as --model")
    trust_remote_code: bool = option(False, "run Python code shipped with the model repository (only for "
                                            "repositories you trust)")
    dtype: str = option("auto", "dtype in memory; auto = the checkpoint's own (statistics stay fp32)",
                        choices=DTYPE_CHOICES)
    device: str | None = option(None, "device to run on, e.g. cpu or cuda:0 (default: where the model loads)")
    device_map: str | None = option(None, "accelerate dispatch over the devices", choices=DEVICE_MAPS)
    max_memory: tuple[str, ...] | None = option(None, "caps for --device-map, e.g. 0=20GiB 1=20GiB cpu=60GiB")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.device_map is not None and self.device is not None:
            raise ConfigError(f"device={self.device!r} and device_map={self.device_map!r} both place the model; "
                              "give one")
        if self.max_memory is not None and self.device_map is None:
            raise ConfigError("max_memory caps a dispatch: give device_map too (e.g. auto)")
        check_device(self.device)  # refused where it enters, before any output is checked or made
        self.max_memory = None if self.max_memory is None else tuple(self.max_memory)
        _max_memory(self.max_memory)  # validates

    def placement(self) -> dict[str, Any]:
        """from_pretrained's dtype / device_map / max_memory arguments."""
        out: dict[str, Any] = {"dtype": "auto" if self.dtype == "auto" else DTYPES[self.dtype]}
        if self.device_map is not None:
            out["device_map"] = {"": "cpu"} if self.device_map == "cpu" else self.device_map
            if self.max_memory:
                out["max_memory"] = _max_memory(self.max_memory)
        return out


def _max_memory(entries: tuple[str, ...] | None) -> dict[int | str, str] | None:
    """('0=20GiB', 'cpu=60GiB') -> {0: '20GiB', 'cpu': '60GiB'} (accelerate's form)."""
    if not entries:
        return None
    caps: dict[int | str, str] = {}
    for entry in entries:
        device, sep, size = str(entry).partition("=")
        if not sep or not device or not size:
            raise ConfigError(f"max_memory entries look like DEVICE=SIZE (e.g. 0=20GiB, cpu=60GiB), got {entry!r}")
        caps[int(device) if device.isdigit() else device] = size
    return caps


def resolve_model(model: str | Path) -> str:
    """A local model folder, or a Hub id (``org/name``) left for transformers to find (in its cache when
    offline). Anything else is refused with the reason."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{str(model)!r} is not a model folder (no config.json)")
        return str(path)
    if HUB_ID.fullmatch(str(model)):
        return str(model)
    raise UnsupportedModelError(f"{str(model)!r} is neither a model folder nor a Hub id like org/name")


def load_model(model: str | Path, dtype: str | LoadOptions = "auto", device: str | None = None,
               with_processor: bool = True, offload_folder: str | Path | None = None) -> tuple[nn.Module, Any]:
    """Load an HF vision-language model and (unless ``with_processor=False``) its processor from a local
    folder or a Hub id.

    With ``offload_folder``, the decoder layers stay on disk (read memory-mapped from the checkpoint's
    safetensors by accelerate's hooks, one layer at a time; pruned weights are written to the folder)
    and the other modules load on ``device`` (default CPU).

    Args:
        model: a local folder or a Hub id.
        dtype: a dtype name (``auto``, ``float32``, ``bfloat16``, ``float16``) or a full :class:`LoadOptions`.
        device: device to load onto (ignored when ``dtype`` is a :class:`LoadOptions`, which has its own).
        with_processor: also load the processor.
        offload_folder: keep the decoder layers on disk, writing pruned weights here.

    Returns:
        ``(model, processor)``; the processor is None with ``with_processor=False``.

    Raises:
        ToolkitError: a subclass naming the problem (a missing or incomplete checkpoint, a bad device).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText

    options = dtype if isinstance(dtype, LoadOptions) else LoadOptions(dtype=dtype, device=device)
    check_device(options.device)
    source = resolve_model(model)
    hub = {"revision": options.revision, "trust_remote_code": options.trust_remote_code}
    config = _load_config(source, hub)
    placement = options.placement()
    if offload_folder is not None:
        if options.device_map is not None:
            raise ConfigError("offload keeps decoder layers on disk with its own map; drop device_map or offload")
        placement.update(_disk_offload(config, options.device, offload_folder))
    try:
        # use_kernels=False: transformers 5.25 swaps in Hub kernels by default; the toolkit hooks, replays and
        # prunes the modules transformers defines (the ones its exactness tests check), on every release alike
        # ignore_mismatched_sizes: a weight of another shape is reported in the loading info (refused below),
        # not raised as a RuntimeError pointing at a table in the log
        model, info = AutoModelForImageTextToText.from_pretrained(source, config=config, use_kernels=False,
                                                                  output_loading_info=True,
                                                                  ignore_mismatched_sizes=True, **hub, **placement)
    except ValueError as err:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} in {source!r} is not an image-text-to-text "
            f"architecture transformers knows ({one_line(err)})") from None
    except (OSError, SafetensorError) as err:
        raise UnsupportedModelError(f"cannot read the weights of {source!r} (missing, truncated or corrupt: "
                                    f"{one_line(err)}); re-save or re-download the model") from None
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met a pickle that would run code
        called = re.search(r"unsupported GLOBAL (\S+)", str(err))
        raise UnsupportedModelError(
            f"the pickled weights of {source!r} (a .bin or .pt checkpoint) would run code "
            f"({called.group(1) if called else 'an object torch.load does not allow'}) when read, so they are "
            "not read; use a safetensors copy of the model, or convert one you trust") from None
    except ImportError as err:  # e.g. a quantization_config whose package is not installed
        quantized = getattr(config, "quantization_config", None)
        method = quantized.get("quant_method") if isinstance(quantized, dict) else \
            getattr(quantized, "quant_method", None)
        what = f"{source!r} is quantized ({method}), which" if method else f"loading {source!r}"
        raise UnsupportedModelError(f"{what} needs a package that is not installed ({one_line(err)}); the "
                                    "toolkit prunes floating-point weights: prune the unquantized model "
                                    "(quantize the pruned one afterwards)") from None
    check_complete(source, info)
    check_floating_point(source, model)
    get_adapter(model)  # raises UnsupportedModelError with the candidates it saw
    if options.device is not None and offload_folder is None:
        model.to(options.device)
    if not with_processor:
        return model.eval(), None
    return model.eval(), _load_processor(source, hub)


def check_floating_point(source: str, model: nn.Module) -> None:
    """Refuse a model whose Linear weights are not floating point (packed or integer quantized weights, e.g.
    bitsandbytes' 4-bit): scores and masks over packed values would prune the wrong weights."""
    packed = sorted({str(m.weight.dtype) for m in model.modules()
                     if isinstance(m, nn.Linear) and isinstance(m.weight, torch.Tensor)
                     and not m.weight.is_floating_point()})
    if packed:
        raise UnsupportedModelError(
            f"{source!r} holds Linear weights of dtype {', '.join(packed)} (a quantized checkpoint); the toolkit "
            "prunes floating-point weights: prune the unquantized model (quantize the pruned one afterwards)")


def check_complete(source: str, info: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose weights do not fill the model its config builds: transformers initialises
    the missing (and the mis-shaped) ones at random, and pruning that model would save a random one. Weights
    the model does not use (unexpected keys) are dropped with a warning. ``info``: from_pretrained's loading
    info (missing, unexpected, mismatched keys)."""
    def listed(key: str) -> str:
        names = sorted(k if isinstance(k, str) else k[0] for k in info.get(key) or ())
        more = f", ... ({len(names)} in all)" if len(names) > 3 else ""
        return f"{', '.join(names[:3])}{more}" if names else ""

    found = [f"{what}: {listed(key)}" for key, what in (("missing_keys", "missing"),
                                                        ("mismatched_keys", "of another shape than the config's"))
             if listed(key)]
    if listed("unexpected_keys"):  # dropped, the model is whole: many Hub checkpoints carry an unused head
        log.warning("%s: the checkpoint holds weights the model does not use (%s); they are ignored", source,
                    listed("unexpected_keys"))
    if found:
        raise UnsupportedModelError(f"the checkpoint in {source!r} is incomplete or does not match its config.json "
                                    f"(weights {'; '.join(found)}); re-save the model with save_pretrained or fix "
                                    "its config")


def dtype_name(model: nn.Module) -> str:
    """The model's parameter dtype as a DTYPES name (e.g. 'bfloat16'), what ``dtype='auto'`` resolved to."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def load_config(model: str | Path, options: LoadOptions | None = None):
    """The transformers config of a model folder or Hub id (no weights read), e.g. for a memory plan."""
    options = options or LoadOptions()
    return _load_config(resolve_model(model), {"revision": options.revision,
                                               "trust_remote_code": options.trust_remote_code})


def _load_config(source: str, hub: dict[str, Any]):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except (OSError, ValueError, KeyError) as err:  # offline and not cached, unknown id or revision, bad config
        if Path(source).is_dir():
            raise UnsupportedModelError(f"cannot read the config.json of {source!r}: {one_line(err)}; fix it or "
                                        "re-save the model with save_pretrained") from None
        raise UnsupportedModelError(f"cannot load model {source!r}{_revision(hub)}: {one_line(err)}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 1:  # refused before any weight is read: nothing to prune or probe
        raise UnsupportedModelError(f"model {source!r} has {layers} decoder layers (num_hidden_layers = {layers} "
                                    "in its config): there is nothing to prune or probe; check the model")
    return config


def _load_processor(source: str, hub: dict[str, Any]):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **hub)
    except (AttributeError, ImportError, ValueError, OSError) as err:
        raise UnsupportedModelError(
            f"cannot load the processor of {source!r} ({type(err).__name__}: {one_line(err)}). Some "
            "transformers processors (e.g. Qwen2-VL's video processor) need torchvision: install the torchvision "
            "build that matches your torch") from None


def _revision(hub: dict[str, Any]) -> str:
    return f" at revision {hub['revision']!r}" if hub.get("revision") else ""


def check_device(device: str | None) -> None:
    """Refuse (before loading) a device string torch cannot parse, ``meta`` (shapes without data: no weights to
    load or prune), or a device this machine does not have."""
    parsed = parse_device("device", device)
    if parsed is None or parsed.type == "cpu":
        return
    count = _device_count(parsed.type)
    if (parsed.index or 0) >= count:
        raise UnsupportedModelError(f"device {device!r} is not available: this torch sees {count} "
                                    f"{parsed.type} device(s); pass --device cpu or a present accelerator")


def current_accelerator() -> torch.device | None:
    """The accelerator this torch would use (its device type), or None when there is none. torch 2.6's
    ``current_accelerator`` raises without one (later releases return None): asked only when one is available."""
    api = getattr(torch, "accelerator", None)
    if api is None or not api.is_available():
        return None
    return api.current_accelerator()


def _device_count(kind: str) -> int:
    """How many devices of type ``kind`` this torch can use (0 when none)."""
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: whichever accelerator is present
    if api is not None:
        current = current_accelerator()
        return api.device_count() if current is not None and current.type == kind else 0
    backend = getattr(torch, kind, None)  # older torch: the backend module of that device type
    available = getattr(backend, "is_available", None)
    return backend.device_count() if available is not None and available() else 0


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
                overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                extra_files: Mapping[str, str] | None = None,
                since: Mapping[str, tuple[int, int] | None] | None = None) -> Path:
    """save_pretrained (safetensors) + processor + ``prune_report.json`` (+ ``extra_files``: name -> text),
    written to a temporary sibling folder and moved into place only when complete. ``since``: the output
    folder's :func:`~pruning.outputs.folder_state` when the run started; what appeared or changed in it since
    is never deleted (see :func:`~pruning.outputs.atomic_folder`)."""
    out = check_output_folder(out_dir, overwrite, inputs)  # an existing folder is empty, or overwrite was asked for
    with atomic_folder(out, "pruned-model", since) as tmp:
        shard = save_shard_size(model)  # offloaded weights are materialised one shard at a time
        model.save_pretrained(tmp, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        check_reloads(model, tmp, out)
    log.info("saved pruned model to %s", out)
    return out


def check_reloads(model: nn.Module, folder: str | Path, out: str | Path | None = None) -> None:
    """Refuse a saved checkpoint that would not load back into ``type(model)`` with every weight (a
    transformers save/load key mismatch reloads random weights with only a warning). The check loads the
    folder on the meta device: it reads the checkpoint's key names, not its tensors."""
    try:
        _, info = type(model).from_pretrained(folder, device_map="meta", use_kernels=False,
                                              output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - a model the meta load cannot handle is saved unverified
        log.warning("could not verify that the saved model reloads (%s: %s)", type(err).__name__, err)
        return
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing or unexpected:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise UnsupportedModelError(
            f"the saved {type(model).__name__} (model_type {model_type!r}) would not reload: transformers finds "
            f"{len(missing)} weights missing (e.g. {missing[:2]}) and {len(unexpected)} unexpected in its own "
            f"checkpoint; nothing was written to {out or folder}. This is a save/load mismatch of transformers "
            f"{_transformers_version()} for this model type")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of an append-only JSON Lines log (blank lines skipped); a torn last line, left by a run
    killed mid-write, is dropped with a warning, while a corrupt line before it is an error naming it. A
    complete last record without its newline (a kill between the two) is a record like any other."""
    path = Path(path)
    text = read_text(path, lambda _: ToolkitError(f"{path}: corrupt result log (not UTF-8 text); use a new --out"))
    last = text.count("\n") + 1

    def torn(number: int) -> None:
        if number != last:  # a finished line (a kill tears only the unterminated last one)
            raise ToolkitError(f"{path}:{number}: corrupt result record; delete the line or use a new --out")
        log.warning("%s: dropping an unfinished last record", path)

    records = []
    try:
        for number, record in json_lines(text):
            if isinstance(record, dict):
                records.append(record)
            else:
                torn(number)
    except JsonLineError as err:
        torn(err.number)
    return records


def seal_log(path: str | Path) -> None:
    """Make a JSON Lines log end on a line boundary before appending to it: a complete last record without
    its newline gets the newline; a torn last line (no JSON record, as :func:`read_log` drops it) is cut off.
    Nothing :func:`read_log` returns is ever removed."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("r+b") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            torn = _log_record(data[start:].decode("utf-8")) is None and bool(data[start:].strip())
        except UnicodeDecodeError:
            torn = True
        if torn:
            f.truncate(start)
        else:
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def _log_record(line: str) -> dict[str, Any] | None:
    """A log line's record, or None when it is not a JSON object (torn or corrupt)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
