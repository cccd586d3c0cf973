"""The ``atv prune`` job: load a model folder, read calibration data, prune, save. One typed function."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from pruning.config import MethodConfig, PruneConfig
from pruning.data import check_dataset_source, load_calibration_dataset, load_llava_conversations
from pruning.engine import PruneReport, prune_
from pruning.errors import CalibrationError, ConfigError, HubError, one_line
from pruning.execution import ExecutionConfig
from pruning.io import LoadOptions, load_config, load_model, save_pruned
from pruning.memory import MemoryPlan, check_memory, plan_memory
from pruning.options import SEED_RANGE, check_fields, option
from pruning.outputs import check_output_folder, folder_state, scratch_folder

from .share import CARD, check_hub_access, check_repo_id, environment, model_card, push_folder, sparsity_config

log = logging.getLogger(__name__)
OFFLOAD_PREFIX = ".atv-offload-"  # + pid: the folder of a killed run is known and removed by the next one
PLAN_TOKENS = 2048  # tokens per calibration sample assumed by the memory plan when --max-length is not given


@dataclass
class PruneJob:
    """Everything ``atv prune`` does: which model, which calibration data, the pruning configuration, where the
    result goes. The command line builds one from its options; :func:`run_prune_job` runs it.

    Args:
        model: HF vision-language model: a local folder (with its processor) or a Hub id.
        out: output folder for the pruned model, its processor and ``prune_report.json``.
        config: what to prune and how (method, sparsity, pool, allocation).
        calib: LLaVA-conversation JSON/JSONL (ShareGPT4V / LLaVA-NeXT-Data format).
        images: the folder the calibration records' image paths are relative to.
        calib_dataset: calibration records from the datasets library instead of ``calib`` (a Hub dataset,
            streamed, or a local parquet/arrow/json file or folder).
        calib_split: split of ``calib_dataset``.
        calib_filter: keep ``calib_dataset`` records whose fields match, e.g. ``source=coco``.
        nsamples: calibration samples.
        seed: seed of the calibration sampling (and of the pruner's random choices).
        max_length: skip calibration records longer than this many tokens.
        batch_size: calibration samples per forward (right-padded; padding never counts).
        overwrite: replace an existing output folder (only one this toolkit wrote).
        allow_outside_paths: accept calibration image paths outside ``images``.
        memory_check: refuse to start when the memory plan predicts too little free memory.
        execution: how to run (offloading, pass schedule).
        load: how the model loads (dtype, devices, revision, remote code).
        recipe: the options as a recipe, saved as ``recipe.yaml`` in ``out``.
        command: the command line, recorded in the report and the model card.
        push_to_hub: after saving, upload the folder to this Hub repository (``org/name``).
        private: with ``push_to_hub``: create the repository as private.
    """
    model: str = option(help="HF vision-language model: a local folder (with its processor) or a Hub id")
    out: Path = option(help="output folder for the pruned model, its processor and prune_report.json")
    config: PruneConfig | MethodConfig = option(cli=False)  # the flat form (command line) or a method's config
    calib: Path | None = option(None, "LLaVA-conversation JSON/JSONL (ShareGPT4V / LLaVA-NeXT-Data format)")
    images: Path | None = option(None, "folder the calibration records' image paths are relative to")
    calib_dataset: str | None = option(None, "calibration records from the datasets library instead of --calib: a "
                                             "Hub dataset (streamed) or a local parquet/arrow/json file or folder")
    calib_split: str = option("train", "split of --calib-dataset")
    calib_filter: tuple[str, ...] = option((), "keep --calib-dataset records whose fields match, e.g. source=coco")
    nsamples: int = option(128, "calibration samples", within=">= 1")
    seed: int = option(0, "seed of the calibration sampling (and of the pruner's random choices)", within=SEED_RANGE)
    max_length: int | None = option(None, "skip calibration records longer than this (tokens)")
    batch_size: int = option(1, "calibration samples per forward (right-padded; padding never counts)",
                             within=">= 1")
    overwrite: bool = option(False, "replace an existing output folder (only one this toolkit wrote)")
    allow_outside_paths: bool = option(False, "accept calibration image paths outside --images")
    memory_check: bool = option(True, "skip the memory plan's check (run even when it predicts too little free "
                                      "memory)", flag="--no-memory-check")
    execution: ExecutionConfig = option(default_factory=ExecutionConfig, cli=False)  # offloading, pass schedule
    load: LoadOptions = option(default_factory=LoadOptions, cli=False)  # revision, dtype, device, device map
    recipe: dict[str, Any] | None = option(None, cli=False)  # the command's options, saved as recipe.yaml
    command: str | None = option(None, cli=False)  # the command line, for the model card
    push_to_hub: str | None = option(None, "after saving, upload the folder to this Hub repository (org/name)",
                                     metavar="REPO")
    private: bool = option(False, "with --push-to-hub: create the repository as private")

    def __post_init__(self) -> None:
        check_fields(self)
        for item in self.calib_filter:
            _key_value(item)  # checked before any work
        if self.calib_dataset is not None:
            check_dataset_source(self.calib_dataset)
        if self.private and not self.push_to_hub:
            raise ConfigError("--private makes the Hub repository of --push-to-hub private; give --push-to-hub "
                              "REPO too, or leave --private out")
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub)

    @property
    def inputs(self) -> tuple[Path | None, ...]:
        """What the run reads (an output may never hold one of these)."""
        return self.model, self.calib, self.images


RECIPE = "recipe.yaml"  # the options a command ran with; `atv prune --recipe` reads it back
# options a recipe never carries and a recipe file may not turn on: recipe.yaml ships in every pruned folder (and
# goes to the Hub), so whether the model repository's Python runs is decided on each command line alone
COMMAND_LINE_ONLY = ("trust_remote_code",)


def recipe_text(recipe: dict[str, Any]) -> str:
    """A recipe as YAML, keys in the command's option order (:data:`COMMAND_LINE_ONLY` left out)."""
    import yaml

    kept = {key: value for key, value in recipe.items() if key not in COMMAND_LINE_ONLY}
    return "# atv-toolkit recipe: re-run with --recipe this-file (flags given on the command line win)\n" + \
        yaml.safe_dump(kept, sort_keys=False)


def run_prune_job(job: PruneJob, progress: bool = True, processor=None) -> PruneReport:
    """Validate everything cheap first, then load, calibrate, prune and save atomically.

    Args:
        job: the job.
        progress: show progress bars.
        processor (transformers.ProcessorMixin): overrides the one saved with the model (e.g. one built in memory).

    Returns:
        The prune report (also saved as ``prune_report.json`` in ``job.out``).

    Raises:
        ToolkitError: a subclass naming what to change (missing calibration data, an output folder that may not
            be replaced, too little memory for the plan, an unsupported model), before any work where it can.
    """
    if job.config.needs_calibration and job.calib_dataset is None and (job.calib is None or job.images is None):
        needs = f"method {job.config.method!r}" if job.config.pool is not None else "allocation 'owl'"
        raise CalibrationError(f"{needs} needs --calib and --images, or --calib-dataset")
    if job.calib is not None and job.calib_dataset is not None:
        raise CalibrationError("give --calib or --calib-dataset, not both")
    check_output_folder(job.out, job.overwrite, job.inputs)
    if job.push_to_hub:
        check_hub_access(job.push_to_hub, job.out)
    since = folder_state(job.out)  # what the swap may replace: nothing added to --out while the run works
    plan = memory_plan(job)
    log.info("%s", plan.summary())
    if job.memory_check:
        check_memory(plan)
    set_seed(job.seed)  # python, numpy and torch
    start = time.perf_counter()
    with _offload_folder(job) as folder:
        return _load_prune_save(job, start, progress, processor, folder, since)


def memory_plan(job: PruneJob) -> MemoryPlan:
    """The run's memory plan from the model's config alone (samples assumed --max-length tokens long,
    else PLAN_TOKENS)."""
    dispatched = job.load.device_map not in (None, "cpu")
    return plan_memory(job.config, job.execution, load_config(job.model, job.load), job.nsamples,
                       job.max_length or PLAN_TOKENS, job.batch_size, job.load.dtype, device=job.load.device,
                       dispatched=dispatched)


def _offload_folder(job: PruneJob) -> contextlib.AbstractContextManager:
    """With ``execution.offload``: a temporary folder beside the output for the pruned, disk-offloaded layers
    (those a killed run left are removed first)."""
    if not job.execution.offload:
        return contextlib.nullcontext(None)
    return scratch_folder(Path(job.out).resolve().parent, OFFLOAD_PREFIX)


def _calibration(job: PruneJob, processor) -> tuple[list, Any]:
    """The calibration batches and report, from the LLaVA JSON or through the datasets library."""
    if job.calib_dataset is None:
        return load_llava_conversations(job.calib, job.images, processor, job.nsamples, job.seed, job.max_length,
                                        job.batch_size, allow_outside=job.allow_outside_paths)
    filters = dict(_key_value(item) for item in job.calib_filter)
    return load_calibration_dataset(job.calib_dataset, processor, job.nsamples, job.seed, split=job.calib_split,
                                    filters=filters, image_dir=job.images, max_length=job.max_length,
                                    batch_size=job.batch_size, allow_outside=job.allow_outside_paths)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise CalibrationError(f"--calib-filter entries look like key=value, got {item!r}")
    return key, value


def _load_prune_save(job: PruneJob, start: float, progress: bool, processor, offload_folder: str | None,
                     since: dict[str, Any]) -> PruneReport:
    model, loaded = load_model(job.model, job.load, with_processor=processor is None,
                               offload_folder=offload_folder)
    processor = processor if processor is not None else loaded
    batches, data_report = [], None
    if job.config.needs_calibration:
        batches, data_report = _calibration(job, processor)
    report = prune_(model, job.config, batches, execution=job.execution, progress=progress)
    source = str(job.calib) if job.calib_dataset is None else f"{job.calib_dataset} ({job.calib_split})"
    calibration = None if data_report is None else {"source": source, **vars(data_report)}
    record = report.to_dict()
    record.update(model_dir=str(job.model), seed=job.seed, total_seconds=time.perf_counter() - start,
                  calibration=calibration, environment=environment(model), command=job.command)
    model.config.sparsity_config = sparsity_config(model, report)
    extra = {CARD: model_card(report, record, base_model=str(job.model), calibration=calibration,
                              command=job.command or "(run from Python)")}
    if job.recipe is not None:
        extra[RECIPE] = recipe_text(job.recipe)
    save_pruned(model, processor, record, job.out, job.overwrite, job.inputs, extra_files=extra, since=since)
    if job.push_to_hub:
        try:
            log.info("uploaded to %s", push_folder(job.out, job.push_to_hub, private=job.private))
        except Exception as err:  # noqa: BLE001 - the network or the Hub failed after the model was saved
            raise HubError(f"the pruned model is saved in {str(job.out)!r}, but uploading it to "
                              f"{job.push_to_hub!r} failed ({type(err).__name__}: {one_line(err)}); upload the "
                              f"folder when the Hub can be reached: hf upload {job.push_to_hub} {job.out}") from None
    return report
