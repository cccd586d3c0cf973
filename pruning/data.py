"""Calibration data: LLaVA-conversation JSON (ShareGPT4V / LLaVA-NeXT-Data) through the model's own
processor and chat template (``prune_`` also takes any iterable of ready model-input dicts).

The LLaVA conversation format::

    [{"id": "...", "image": "coco/000001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                        {"from": "gpt", "value": "A cat."}]}, ...]

Policy for unusable records (reported, never silent): a record without an image, whose image file is missing
or unreadable (corrupt, truncated, not an image, above PIL's decompression-bomb limit), or whose tokenised
text is longer than ``max_length`` is *skipped* and counted in the returned :class:`CalibrationReport`; too
few usable records to reach ``nsamples`` is an error, as is a malformed record (not an object, missing
``conversations``, a turn that is not an object, a speaker that is not a known name, text that is not
Unicode (a lone surrogate), an ``image`` that is not one path string, an image without exactly one
``<image>`` tag in its turns, JSON nested too deeply to read) and an image path that leads outside the image
folder (unless ``allow_outside``).
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .errors import CalibrationError
from .jsonlines import JsonLineError, json_lines, read_text
from .templates import render_chat

log = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class CalibrationReport:
    requested: int
    used: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"no_image": 0, "missing_image": 0,
                                                             "unreadable_image": 0, "too_long": 0})
    ids: list[str] = field(default_factory=list)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA-conversation file: a JSON list, or JSON Lines (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    text = read_text(path, lambda err: CalibrationError(f"calibration file {str(path)!r} is not UTF-8 text (byte "
                                                         f"{err.start}); save it as UTF-8 JSON"))
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            records = [record for _, record in json_lines(text)]
        except JsonLineError as err:
            why = ("JSON nested too deeply to read; a record is an object of 'image' and 'conversations'"
                   if err.too_deep else f"not valid JSON ({err.msg})")
            raise CalibrationError(f"{path}:{err.number}: {why}") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise CalibrationError(f"calibration file {str(path)!r} holds JSON nested too deeply to read; a record is "
                               "an object of 'image' and 'conversations'") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise CalibrationError(f"{path}: record {bad} is a {type(records[bad]).__name__}, not an object with "
                               "'image' and 'conversations'")
    return records


def to_messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """LLaVA turns -> chat-template messages; the ``<image>`` tag becomes an image content item."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise CalibrationError(f"record {record.get('id', '?')!r} has no 'conversations' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise CalibrationError(f"record {record.get('id', '?')!r}: a turn is a {type(turn).__name__}, not an "
                                   "object with 'from' and 'value'")
        speaker = turn.get("from")
        role = _ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise CalibrationError(f"record {record.get('id', '?')!r}: unknown speaker {speaker!r}; 'from' is one "
                                   f"of {', '.join(_ROLES)}")
        value = str(turn.get("value", ""))
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates, which are no text
            raise CalibrationError(f"record {record.get('id', '?')!r}: a turn's text holds "
                                   f"{value[err.start]!r}, half of a UTF-16 surrogate pair, which is not text; "
                                   "fix the record's escapes") from None
        content: list[dict[str, Any]] = []
        if IMAGE_TAG in value:
            before, _, after = value.partition(IMAGE_TAG)
            if before.strip():
                content.append({"type": "text", "text": before.strip()})
            content.append({"type": "image"})
            value = after.replace(IMAGE_TAG, "")
        if value.strip():
            content.append({"type": "text", "text": value.strip()})
        messages.append({"role": role, "content": content})
    return messages


def open_image(path: str | Path):
    """The image at ``path`` as an RGB ``PIL.Image`` (loaded, file closed): calibration and evaluation alike.

    An image above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, warned about or refused by PIL)
    is a ValueError, as a corrupt file is: it is never decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"image {str(path)!r} is too large to decode safely ({err})") from None


def image_file(record: Mapping[str, Any], image_dir: Path, allow_outside: bool = False) -> Path:
    """The image file a record names, inside ``image_dir`` unless ``allow_outside`` (raises naming the record)."""
    value, where = record["image"], f"record {record.get('id', '?')!r}"
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: 'image' must be one path string, got {type(value).__name__} {value!r}")
    tags = sum(part["type"] == "image" for message in to_messages(record) for part in message["content"])
    if tags == 0:
        raise CalibrationError(f"{where} has an image but no {IMAGE_TAG} tag in its turns; put {IMAGE_TAG} where "
                               "the image goes (e.g. at the start of the first human turn)")
    if tags > 1:
        raise CalibrationError(f"{where} has {tags} turns with an {IMAGE_TAG} tag but one image; keep the tag "
                               "only where the image goes")
    path = image_dir / value
    if not allow_outside and not inside(path, image_dir):
        raise CalibrationError(f"{where}: image {value!r} is outside the image folder {str(image_dir)!r}; fix the "
                               "path or pass --allow-outside-paths")
    return path


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (links and '..' resolved) lies in ``folder``."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    return resolved == root or root in resolved.parents


def encode_records(records: list[Mapping[str, Any]], images: list, processor) -> dict[str, torch.Tensor]:
    """Records -> one batch of model inputs via the processor's chat template. Several records are
    right-padded (padding never shifts the real tokens' positions; the engine masks it out)."""
    if getattr(processor, "chat_template", None) is None:
        raise CalibrationError(f"the processor {type(processor).__name__} has no chat template; "
                               "set processor.chat_template before loading calibration data")
    prompts = [render_chat(processor, to_messages(r)) for r in records]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        return dict(processor(images=images, text=prompts, padding=len(prompts) > 1, return_tensors="pt"))
    finally:
        tokenizer.padding_side = side


def check_calibration_paths(path: str | Path, image_dir: str | Path) -> None:
    """Refuse a missing calibration file or image folder (before any model is loaded)."""
    if not Path(path).is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    if not Path(image_dir).is_dir():
        raise CalibrationError(f"image folder {str(image_dir)!r} does not exist")


def load_llava_conversations(path: str | Path, image_dir: str | Path, processor, nsamples: int = 128,
                             seed: int = 0, max_length: int | None = None,
                             batch_size: int = 1, allow_outside: bool = False,
                             ) -> tuple[list[dict[str, torch.Tensor]], CalibrationReport]:
    """Sample ``nsamples`` usable records of a LLaVA-conversation file (ShareGPT4V / LLaVA-NeXT-Data format)
    in a seeded order and encode them in batches of ``batch_size``.

    Args:
        path: the JSON or JSONL file of conversation records.
        image_dir: the folder the records' image paths are relative to.
        processor (transformers.ProcessorMixin): the model's processor (it builds the prompt and the pixel inputs).
        nsamples: how many usable records to take.
        seed: seed of the order the records are read in.
        max_length: skip records longer than this many tokens.
        batch_size: samples per batch (right-padded; padding never counts in the statistics).
        allow_outside: accept image paths outside ``image_dir``.

    Returns:
        ``(batches of model inputs, report)``; the report counts the records skipped and why.

    Raises:
        CalibrationError: ``nsamples`` or ``batch_size`` below 1, or fewer usable records than asked for.
    """
    if nsamples < 1 or batch_size < 1:
        raise CalibrationError(f"nsamples and batch_size must be >= 1, got {nsamples} and {batch_size}")
    check_calibration_paths(path, image_dir)
    image_dir = Path(image_dir)
    records = read_records(path)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)

    def image_of(record: Mapping[str, Any]):
        image_path = image_file(record, image_dir, allow_outside)
        return open_image(image_path) if image_path.is_file() else None

    candidates = ((str(records[i].get("id", i)), records[i]) for i in order)
    return _sample(candidates, image_of, processor, nsamples, max_length, batch_size, repr(str(path)))


def load_calibration_dataset(source: str | Path, processor, nsamples: int = 128, seed: int = 0, *,
                             split: str = "train", filters: Mapping[str, str] | None = None,
                             image_dir: str | Path | None = None, max_length: int | None = None,
                             batch_size: int = 1, allow_outside: bool = False,
                             ) -> tuple[list[dict[str, torch.Tensor]], CalibrationReport]:
    """Calibration records in the LLaVA conversation format from the ``datasets`` library: a Hub dataset
    name (streamed, shuffled in a seeded buffer) or a local parquet/arrow/json file or folder (shuffled
    whole, seeded). ``filters`` keep records whose fields equal the given strings; an ``image`` field is
    an image (decoded by ``datasets``) or a path inside ``image_dir``. Same sampling report and skip
    accounting as :func:`load_llava_conversations`."""
    if nsamples < 1 or batch_size < 1:
        raise CalibrationError(f"nsamples and batch_size must be >= 1, got {nsamples} and {batch_size}")
    dataset = _open_dataset(source, split)
    if isinstance(dataset, list):
        random.Random(seed).shuffle(dataset)
    else:
        dataset = dataset.shuffle(seed=seed, buffer_size=10_000)
    wanted = dict(filters or {})

    def image_of(record: Mapping[str, Any]):
        value = record.get("image")
        if hasattr(value, "convert"):  # a decoded PIL image
            return value.convert("RGB")
        if image_dir is None:
            raise CalibrationError(f"record {record.get('id', '?')!r} of {str(source)!r} names its image by path "
                                   f"({value!r}); pass --images, the folder those paths are relative to")
        image_path = image_file(record, Path(image_dir), allow_outside)
        return open_image(image_path) if image_path.is_file() else None

    candidates = ((str(r.get("id", i)), r) for i, r in enumerate(dataset)
                  if all(str(r.get(k)) == v for k, v in wanted.items()))
    return _sample(candidates, image_of, processor, nsamples, max_length, batch_size, repr(str(source)))


DATASET_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


def check_dataset_source(source: str | Path) -> None:
    """Refuse a ``--calib-dataset`` that looks like a local path but is not there (else it would be taken for
    a Hub id). Path-looking: a :class:`Path`, a name starting with ``.``, ``/`` or ``~``, holding a backslash or
    more than the one ``/`` of ``org/name``, or ending in a dataset file's suffix."""
    text = str(source)
    looks_local = (isinstance(source, Path) or text.startswith((".", "/", "~")) or "\\" in text
                   or text.count("/") > 1 or Path(text).suffix.lower() in DATASET_SUFFIXES)
    if looks_local and not Path(text).expanduser().exists():
        raise CalibrationError(f"--calib-dataset {text!r} looks like a local path but does not exist; give an "
                               f"existing .parquet/.arrow/.json(l) file or folder, or a Hub id like org/name")


def _open_dataset(source: str | Path, split: str):
    """A local dataset as a list of records, or a streamed Hub dataset."""
    try:
        import datasets
    except ImportError:
        raise CalibrationError("--calib-dataset needs the datasets library: pip install datasets") from None
    check_dataset_source(source)
    path = Path(source).expanduser()
    try:
        if path.is_file():
            kind = DATASET_SUFFIXES.get(path.suffix)
            if kind is None:
                raise CalibrationError(f"{str(source)!r}: a calibration dataset file is .parquet, .arrow or .json(l)")
            return list(datasets.load_dataset(kind, data_files=str(path), split=split))
        if path.is_dir():
            return list(datasets.load_dataset(str(path), split=split))
        return datasets.load_dataset(str(source), split=split, streaming=True)
    except ConnectionError as err:  # datasets' own, offline (HF_HUB_OFFLINE) or with no network alike
        raise CalibrationError(f"the Hub is unreachable, so calibration dataset {str(source)!r} cannot be opened "
                               f"({' '.join(str(err).split())[:200]}); connect, or give a local file or folder"
                               ) from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise CalibrationError(f"cannot open calibration dataset {str(source)!r} (split {split!r}): "
                               f"{' '.join(str(err).split())[:300]}") from None


def _sample(candidates: Iterable[tuple[str, Mapping[str, Any]]], image_of: Callable[[Mapping[str, Any]], Any],
            processor, nsamples: int, max_length: int | None, batch_size: int,
            source: str) -> tuple[list[dict[str, torch.Tensor]], CalibrationReport]:
    """The first ``nsamples`` usable records of ``candidates`` (in their order), encoded; every skip counted."""
    report, samples, usable = CalibrationReport(requested=nsamples), [], []
    for record_id, record in candidates:  # read no further than needed: a streamed source is fetched lazily
        if not record.get("image"):
            report.skipped["no_image"] += 1
            continue
        try:
            image = image_of(record)
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for corrupt or truncated files
            log.debug("calibration: the image of %s is unreadable (%s)", record_id, err)
            report.skipped["unreadable_image"] += 1
            continue
        if image is None:
            report.skipped["missing_image"] += 1
            continue
        inputs = encode_records([record], [image], processor)
        if max_length is not None and inputs["input_ids"].shape[1] > max_length:
            report.skipped["too_long"] += 1
            continue
        samples.append(inputs)
        usable.append((record, image))
        report.ids.append(record_id)
        if len(samples) == nsamples:
            break
    report.used = len(samples)
    if any(report.skipped.values()):
        log.warning("calibration: skipped %s of the records read", report.skipped)
    if report.used < nsamples:
        raise CalibrationError(
            f"only {report.used} usable calibration records in {source} (asked for {nsamples}; "
            f"skipped {report.skipped}); lower --nsamples or fix the data")
    if batch_size > 1:
        groups = [usable[i:i + batch_size] for i in range(0, len(usable), batch_size)]
        samples = [encode_records([r for r, _ in g], [im for _, im in g], processor) for g in groups]
    return samples, report
