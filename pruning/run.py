"""The ``atv prune`` job: load a model folder, read calibration data, prune, save. One typed function."""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import PruneConfig
from .data import load_llava_conversations
from .engine import PruneReport, prune_
from .errors import CalibrationError
from .execution import ExecutionConfig
from .io import check_output_dir, load_model, save_pruned


@dataclass
class PruneJob:
    model: Path                  # folder of an HF vision-language model (with its processor)
    out: Path                    # where the pruned model, processor and prune_report.json go
    config: PruneConfig
    calib: Path | None = None    # LLaVA-conversation JSON/JSONL
    images: Path | None = None   # folder the records' "image" paths are relative to
    nsamples: int = 128
    seed: int = 0
    max_length: int | None = None
    batch_size: int = 1          # calibration samples per forward (right-padded; padding never counts)
    dtype: str = "float32"
    device: str | None = None
    overwrite: bool = False
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)  # offloading, pass schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_prune_job(job: PruneJob, progress: bool = True, processor=None) -> PruneReport:
    """Validate everything cheap first, then load, calibrate, prune and save atomically.

    ``processor`` overrides the one saved with the model (e.g. one built in memory)."""
    check_output_dir(job.out, job.overwrite)
    if job.config.needs_calibration and (job.calib is None or job.images is None):
        raise CalibrationError(f"method {job.config.method!r} needs --calib and --images")
    seed_everything(job.seed)
    start = time.perf_counter()
    with _offload_folder(job) as folder:
        return _load_prune_save(job, start, progress, processor, folder)


def _offload_folder(job: PruneJob) -> contextlib.AbstractContextManager:
    """With ``execution.offload``: a temporary folder beside the output for the pruned, disk-offloaded layers."""
    if not job.execution.offload:
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
                                                        job.seed, job.max_length, job.batch_size)
    report = prune_(model, job.config, batches, execution=job.execution, progress=progress)
    record = report.to_dict()
    record.update(model_dir=str(job.model), seed=job.seed, total_seconds=time.perf_counter() - start,
                  calibration=None if data_report is None else vars(data_report))
    save_pruned(model, processor, record, job.out, job.overwrite)
    return report
