"""The ``atv prune`` job: load a model folder, read calibration data, prune, save. One typed function."""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from pruning.config import PruneConfig
from pruning.data import load_llava_conversations
from pruning.engine import PruneReport, prune_
from pruning.errors import CalibrationError, ConfigError
from pruning.io import DTYPES, check_output_dir, load_model, save_pruned
from pruning.options import option


@dataclass
class PruneJob:
    model: Path = option(help="HF vision-language model folder (with its processor)")
    out: Path = option(help="output folder for the pruned model, its processor and prune_report.json")
    config: PruneConfig = option(cli=False)
    calib: Path | None = option(None, "LLaVA-conversation JSON/JSONL (ShareGPT4V / LLaVA-NeXT-Data format)")
    images: Path | None = option(None, "folder the calibration records' image paths are relative to")
    nsamples: int = option(128, "calibration samples")
    seed: int = option(0, "seed of the calibration sampling (and of the pruner's random choices)")
    max_length: int | None = option(None, "skip calibration records longer than this (tokens)")
    batch_size: int = option(1, "calibration samples per forward (right-padded; padding never counts)")
    dtype: str = option("float32", "dtype the model is loaded in", choices=tuple(DTYPES))
    device: str | None = option(None, "device to run on, e.g. cpu or cuda:0 (default: where the model loads)")
    overwrite: bool = option(False, "replace an existing output folder (only one this toolkit wrote)")
    allow_outside_paths: bool = option(False, "accept calibration image paths outside --images")

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.batch_size < 1:
            raise ConfigError(f"nsamples and batch_size must be >= 1, got {self.nsamples} and {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")

    @property
    def inputs(self) -> tuple[Path | None, ...]:
        """What the run reads (an output may never hold one of these)."""
        return self.model, self.calib, self.images


def run_prune_job(job: PruneJob, progress: bool = True, processor=None) -> PruneReport:
    """Validate everything cheap first, then load, calibrate, prune and save atomically.

    ``processor`` overrides the one saved with the model (e.g. one built in memory)."""
    check_output_dir(job.out, job.overwrite, job.inputs)
    if job.config.needs_calibration and (job.calib is None or job.images is None):
        raise CalibrationError(f"method {job.config.method!r} needs --calib and --images")
    set_seed(job.seed)  # python, numpy and torch
    start = time.perf_counter()
    with _offload_folder(job) as folder:
        return _load_prune_save(job, start, progress, processor, folder)


def _offload_folder(job: PruneJob) -> contextlib.AbstractContextManager:
    """With ``config.offload``: a temporary folder beside the output for the pruned, disk-offloaded layers."""
    if not job.config.offload:
        return contextlib.nullcontext(None)
    parent = Path(job.out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".atv-offload-", dir=parent)


def _load_prune_save(job: PruneJob, start: float, progress: bool, processor, offload_folder: str | None) -> PruneReport:
    model, loaded = load_model(job.model, job.dtype, job.device, with_processor=processor is None,
                               offload_folder=offload_folder)
    processor = processor if processor is not None else loaded
    batches, data_report = [], None
    if job.config.needs_calibration:
        batches, data_report = load_llava_conversations(job.calib, job.images, processor, job.nsamples,
                                                        job.seed, job.max_length, job.batch_size,
                                                        allow_outside=job.allow_outside_paths)
    report = prune_(model, job.config, batches, progress=progress)
    record = report.to_dict()
    record.update(model_dir=str(job.model), seed=job.seed, total_seconds=time.perf_counter() - start,
                  calibration=None if data_report is None else vars(data_report))
    save_pruned(model, processor, record, job.out, job.overwrite, job.inputs)
    return report
