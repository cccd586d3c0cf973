"""The MoT sensitivity study: prune one pathway with one calibration pool at one sparsity, evaluate,
restore, and repeat over the grid pathway x pool x sparsity (plus the dense baseline).

Results go to a :class:`~atv.experiments.records.ResultLog` (``OUT/results.jsonl``, one fsynced record per
finished cell; ``OUT/study.json`` pins the setup), so an interrupted study re-run with the same
arguments computes only the missing cells.

In this process the model is loaded once: the probe computes exactly the original model while unpruned,
and ``reset_`` drops a pruned path's copy, so every cell starts from the dense model. With ``--executor
ray`` each cell is a task that loads the model itself (:class:`ProbeCells`); ``--cells`` and ``--shard``
pick the cells of a run (see :class:`~atv.experiments.cells.CellSelection`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from analysis.tables import probe_table, write_table
from evaluation import Benchmark, load_benchmark
from evaluation.intervals import Bootstrap
from mot_probe.surgery import PROBE_POOLS, attach_probe_, probe_pool
from pruning.config import PruneConfig
from pruning.data import check_calibration_paths
from pruning.engine import PruneReport
from pruning.errors import ConfigError
from pruning.io import LoadOptions, dtype_name, resolve_model
from pruning.options import option
from pruning.outputs import write_text_atomic

from .cells import (
    CellInputs,
    CellSelection,
    StudySettings,
    benchmark_inputs,
    cell_name,
    dense_reference,
    evaluate_cell,
    load_reference,
    measure_cell,
    open_benchmarks,
    open_log,
    run_cells,
)
from .executors import ExecutorOptions, InProcess, RayExecutor, make_executor
from .prune_job import PLAN_TOKENS, RECIPE, recipe_text
from .records import ResultLog, check_inputs, check_study_folder, file_digest, model_inputs, read_setup, study_lock
from .sensitivity_map import MapConfig, MapResult, run_map_study

log = logging.getLogger(__name__)


@dataclass
class StudyConfig(StudySettings):
    """The probe grid: pathway x calibration pool x sparsity, plus the dense cell (and the settings every study
    shares, :class:`~atv.experiments.cells.StudySettings`).

    Args:
        pathways: the pruned pathway(s); the other stays dense.
        method: the pruner used on the path (``wanda`` or ``sparsegpt``: one that takes the pool as given).
        seed: seed of the calibration sampling and the pruner.
        batch_size: evaluation batch size.
        max_new_tokens: answer length on open-answer benchmarks.
        pools: calibration pool(s) of the pruner (``text``, ``visual``, ``mixed``).
        sparsities: unstructured sparsities, per output row.
    """

    pools: tuple[str, ...] = option(tuple(PROBE_POOLS), "calibration pool(s)", choices=PROBE_POOLS,
                                    label="probe pool")
    sparsities: tuple[float, ...] = option((0.5, 0.6), "unstructured sparsities, per output row", within="(0, 1)")

    def cells(self) -> list[dict[str, Any]]:
        """The dense baseline first, then the grid in a fixed order."""
        grid = [{"pathway": p, "pool": q, "sparsity": s} for s in self.sparsities for p in self.pathways
                for q in self.pools]
        return [{"pathway": "dense"}] + grid


@dataclass
class StudyResult:
    out_dir: Path
    records: list[dict[str, Any]]                     # complete records of results.jsonl, in grid order
    computed: int                                     # cells computed by this run (the rest were resumed)
    tables: list[Path] = field(default_factory=list)  # none for a shard: its records wait for --merge
    missing: list[str] = field(default_factory=list)  # names of grid cells without a record
    shard: str | None = None                          # 'i/n' for a shard's run

    @property
    def table(self) -> tuple[list[str], list[list[str]]]:
        return probe_table(self.records)


def run_probe_study(model: nn.Module, processor, calibration: Sequence[Mapping[str, Any]],
                    benchmarks: Iterable[Benchmark | str | Path], out_dir: str | Path,
                    config: StudyConfig | None = None, *, setup_extra: Mapping[str, Any] | None = None,
                    progress: bool = True, on_cell: Callable[[dict[str, Any]], None] | None = None,
                    selection: CellSelection | None = None) -> StudyResult:
    """Run (or resume) the probe grid on ``model`` (probed in place, unloaded at the end), in this process.

    calibration: model-input batches (with images) for the pruner; benchmarks: harness benchmarks.
    ``setup_extra`` (e.g. model folder, calibration file) joins the pinned setup. ``on_cell`` is
    called with each new record (tests use it to interrupt a run). ``selection``: which cells (all).
    """
    config = config or StudyConfig()
    selection = selection or CellSelection()
    selection.matching(config.cells())  # a pattern matching nothing is refused before any work
    benches = open_benchmarks(benchmarks)
    with study_lock(out_dir, selection.part):
        results = open_log(out_dir, config, benches, len(calibration), setup_extra, selection.part)
        probe = attach_probe_(model)
        try:
            reference = load_reference(results, benches, lambda: dense_reference(model, processor, benches, progress))

            def measure(cell: dict[str, Any], reference) -> dict[str, Any]:
                try:
                    return _measure(probe, model, processor, calibration, benches, config, cell, reference, progress)
                finally:
                    probe.reset_()

            computed = run_cells(results, config.cells(), measure, reference, desc="probe cells", progress=progress,
                                 on_cell=on_cell, selection=selection)
        finally:
            probe.unload()
        return _result(results, config, computed)


@dataclass(frozen=True)
class ProbeCells:
    """The probe study's cells as a task that runs in any process (a Ray worker): it loads the model, the
    calibration and the benchmarks from ``inputs``, probes the model and measures one cell. Picklable."""

    inputs: CellInputs
    config: StudyConfig

    def __call__(self, cell: dict[str, Any], reference) -> dict[str, Any]:
        model, processor, calibration, benches = self.inputs.open()
        probe = attach_probe_(model)
        return _measure(probe, model, processor, calibration, benches, self.config, cell, reference, progress=False)

    def reference(self):
        return self.inputs.reference()


def run_probe_cells(task: ProbeCells, out_dir: str | Path, executor: InProcess | RayExecutor, *,
                    calibration_batches: int, setup_extra: Mapping[str, Any] | None = None, progress: bool = True,
                    selection: CellSelection | None = None,
                    on_cell: Callable[[dict[str, Any]], None] | None = None) -> StudyResult:
    """Run (or resume) the probe grid with ``executor`` computing each missing cell with ``task`` (each loads
    its own model: nothing is loaded here); this process alone writes the records as they come back. The
    setup pinned is the same as :func:`run_probe_study`'s, so either may resume the other's study."""
    selection = selection or CellSelection()
    selection.matching(task.config.cells())
    benches = task.inputs.open_benchmarks()
    with study_lock(out_dir, selection.part):
        results = open_log(out_dir, task.config, benches, calibration_batches, setup_extra, selection.part)
        reference = load_reference(results, benches, lambda: executor.call(task.reference))
        computed = run_cells(results, task.config.cells(), task, reference, desc="probe cells", progress=progress,
                             on_cell=on_cell, executor=executor, selection=selection)
        return _result(results, task.config, computed)


def merge_probe_study(out_dir: str | Path, config: StudyConfig, benchmarks: Sequence[str]) -> StudyResult:
    """``atv probe --merge``: append every shard's measurements to results.jsonl as records and write the table
    (needs no model). The study's pinned grid and benchmarks must be ``config`` and ``benchmarks`` (names)."""
    with study_lock(out_dir):
        saved = read_setup(out_dir)
        if saved is None:
            raise ConfigError(f"{out_dir} holds no study yet (no study.json): run its shards first")
        asked = {"config": asdict(config), "benchmarks": list(benchmarks)}
        differs = sorted(k for k, v in asked.items() if saved.get(k) != json.loads(json.dumps(v)))
        if differs:
            raise ConfigError(f"{out_dir} holds a study with a different setup (differs in {differs}); merge with "
                              "the options its shards ran with")
        results = ResultLog(out_dir, saved)
        run_cells(results, config.cells(), None, desc="merge", progress=False, selection=CellSelection(merge=True))
        return _result(results, config, 0)


def _result(results: ResultLog, config: StudyConfig, computed: int) -> StudyResult:
    """The run's result; the table is written by runs on the whole log (a shard's records wait for a merge)."""
    cells = config.cells()
    result = StudyResult(results.out_dir, results.ordered(cells), computed=computed,
                         missing=[cell_name(c) for c in cells if results.find(c) is None],
                         shard=None if results.shard is None else str(results.shard))
    if results.shard is None:
        result.tables = write_table(result.table, "probe_table", results.out_dir)
    return result


def _measure(probe, model: nn.Module, processor, calibration, benches, config: StudyConfig, cell: dict[str, Any],
             reference, progress: bool) -> dict[str, Any]:
    """One cell on a probed model: prune the cell's path, evaluate (the caller resets the probe)."""
    return measure_cell(cell, lambda: _prune_path(probe, calibration, config, cell),
                        lambda: evaluate_cell(model, processor, benches, config, reference, progress),
                        model, Bootstrap(seed=config.seed))


def _prune_path(probe, calibration, config: StudyConfig, cell: dict[str, Any]) -> PruneReport | None:
    """Prune the cell's path with its pool (nothing for the dense cell)."""
    if cell["pathway"] == "dense":
        return None
    prune_config = PruneConfig(config.method, sparsity=cell["sparsity"], pool=probe_pool(cell["pool"]),
                               seed=config.seed)
    return probe.prune_path_(cell["pathway"], prune_config, calibration, progress=False)


@dataclass
class ProbeJob:
    """Everything ``atv probe`` does: the model, calibration data and benchmarks, the grid (or the sensitivity
    map), where the study folder is and how the cells run. :func:`run_probe_job` runs it.

    Args:
        model: HF vision-language model: a local folder (with its processor) or a Hub id.
        calib: LLaVA-conversation JSON/JSONL for the pruner.
        images: the image folder of the calibration records.
        benchmarks: benchmark JSONL files.
        out: the study folder; re-running the same job resumes it.
        config: the grid.
        map: run the sensitivity map instead of the grid.
        map_config: the map's options.
        nsamples: calibration samples.
        max_length: skip calibration records longer than this many tokens.
        load: how the model loads.
        recipe: the options as a recipe, saved as ``recipe.yaml``.
        allow_outside_paths: accept benchmark and calibration image paths outside their folder.
        run: where the cells run (in this process, or as Ray tasks).
        memory_check: refuse, before loading, a study the memory plan says will not fit in this process.
        selection: which cells this run computes (patterns, a shard, or a merge).
    """
    model: str = option(help="HF vision-language model: a local folder (with its processor) or a Hub id")
    calib: Path = option(help="LLaVA-conversation JSON/JSONL for the pruner")
    images: Path = option(help="image folder of the calibration records")
    benchmarks: tuple[Path, ...] = option(help="benchmark JSONL files", flag="--bench")
    out: Path = option(help="study folder; re-run the same command to resume")
    config: StudyConfig = option(default_factory=StudyConfig, cli=False)
    map: bool = option(False, "the sensitivity map instead of the grid: per cell one decoder layer's path and "
                              "projection group pruned (options --map-*), scored by KL / top-1 to the dense model")
    map_config: MapConfig = option(default_factory=MapConfig, cli=False)
    nsamples: int = option(128, "calibration samples")
    max_length: int | None = option(None, "skip calibration records longer than this (tokens)")
    load: LoadOptions = option(default_factory=LoadOptions, cli=False)  # revision, dtype, device, device map
    recipe: dict[str, Any] | None = option(None, cli=False)  # the command's options, saved as recipe.yaml
    allow_outside_paths: bool = option(False, "accept benchmark and calibration image paths outside their folder")
    run: ExecutorOptions = option(default_factory=ExecutorOptions, cli=False)  # in-process or Ray
    memory_check: bool = option(True, "skip the memory plan's check (load even when it predicts too little free "
                                      "memory)", flag="--no-memory-check")
    selection: CellSelection = option(default_factory=CellSelection, cli=False)  # --cells, --shard, --merge

    @property
    def inputs(self) -> tuple[Path, ...]:
        """What the study reads (its folder may never hold one of these)."""
        return (self.model, self.calib, self.images, *self.benchmarks)


    def cell_inputs(self) -> CellInputs:
        """What a cell task loads (calibration in batches of one, as this job loads it)."""
        return CellInputs(str(self.model), str(self.calib), str(self.images), tuple(map(str, self.benchmarks)),
                          self.nsamples, self.config.seed, self.max_length, 1, self.allow_outside_paths, self.load)


def run_probe_job(job: ProbeJob, progress: bool = True, processor=None,
                  executor: InProcess | RayExecutor | None = None) -> StudyResult | MapResult:
    """Load the model and the calibration data, then run or resume the study (``atv probe``): the grid, or
    the sensitivity map with ``job.map``. With the Ray executor (``job.run`` or ``executor``) the grid's cells
    load their own model and this process loads none; the map runs in this process.

    Args:
        job: the job.
        progress: show progress bars.
        processor (transformers.ProcessorMixin): overrides the one saved with the model (e.g. one built in memory).
        executor: where the cells run; None = the one ``job.run`` names.

    Returns:
        The grid's records and table, or the map's result with ``job.map``.

    Raises:
        ToolkitError: a subclass naming what to change (a changed input of a study being resumed, a folder in
            use, a bad benchmark or grid), before any work where it can.
    """
    # every check that needs no model first: benchmark files, paths, the inputs of a study being resumed
    benches = [load_benchmark(path, job.allow_outside_paths) for path in job.benchmarks]
    check_study_folder(job.out, [*job.inputs, *(item.image for bench in benches for item in bench.items)])
    check_calibration_paths(job.calib, job.images)
    source = resolve_model(job.model)  # a folder with config.json, or a Hub id
    revision = job.load.revision or "main"
    model_print = model_inputs(source) if Path(source).is_dir() else {"model": f"{source}@{revision}"}
    inputs = {**model_print, "calibration file": file_digest(job.calib), **benchmark_inputs(benches)}
    check_inputs(job.out, inputs)
    if job.map:
        result = _run_map_here(job, benches, inputs, progress, processor, executor)
    elif job.selection.merge:
        job.selection.matching(job.config.cells())
        result = merge_probe_study(job.out, job.config, [b.name for b in benches])
    else:
        job.selection.matching(job.config.cells())
        executor = executor or make_executor(job.run)
        try:
            with study_lock(job.out, job.selection.part):
                result = (_run_remote(job, executor, inputs, progress) if executor.remote else
                          _run_here(job, benches, inputs, progress, processor))
        finally:
            executor.close()
    if job.recipe is not None and getattr(result, "shard", None) is None:
        write_text_atomic(result.out_dir / RECIPE, recipe_text(job.recipe))
    return result


def _setup_extra(job: ProbeJob, dtype: str, calibration_ids: list[str], inputs: Mapping[str, str]) -> dict[str, Any]:
    """What ``atv probe`` pins besides the grid (the same in-process and on Ray)."""
    return {"model": str(job.model), "calib": str(job.calib), "images": str(job.images),
            "nsamples": job.nsamples, "max_length": job.max_length, "calib_batch_size": 1,
            "dtype": dtype, "calibration_ids": calibration_ids, "inputs": dict(inputs),
            **({"revision": job.load.revision} if job.load.revision else {})}


def _check_memory(job: ProbeJob) -> None:
    """Refuse, before loading, a study whose memory plan (the probed model, a cell's pruning and evaluation)
    exceeds the free memory (samples assumed --max-length tokens long, else PLAN_TOKENS)."""
    from pruning.io import load_config
    from pruning.memory import PROBE_REMEDIES, check_memory, plan_probe_memory

    settings = job.map_config if job.map else job.config
    dispatched = job.load.device_map not in (None, "cpu")
    plan = plan_probe_memory(PruneConfig(settings.method), load_config(job.model, job.load), job.nsamples,
                             job.max_length or PLAN_TOKENS, settings.batch_size, job.load.dtype,
                             device=job.load.device, dispatched=dispatched)
    log.info("%s", plan.summary())
    check_memory(plan, remedies=PROBE_REMEDIES)


def _load_here(job: ProbeJob, inputs, processor) -> tuple[nn.Module, Any, list[dict[str, Any]], dict[str, Any]]:
    """(model, processor, calibration batches, setup extra) as ``atv probe`` loads them in this process: seeded
    first."""
    from transformers import set_seed

    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    if job.memory_check:
        _check_memory(job)
    set_seed(job.config.seed)
    model, loaded = load_model(job.model, job.load, with_processor=processor is None)
    processor = processor if processor is not None else loaded
    calibration, calib_report = load_llava_conversations(job.calib, job.images, processor, job.nsamples,
                                                         job.config.seed, job.max_length,
                                                         allow_outside=job.allow_outside_paths)
    return model, processor, calibration, _setup_extra(job, dtype_name(model), calib_report.ids, inputs)


def _run_here(job: ProbeJob, benches, inputs, progress: bool, processor) -> StudyResult:
    model, processor, calibration, extra = _load_here(job, inputs, processor)
    return run_probe_study(model, processor, calibration, benches, job.out, job.config, setup_extra=extra,
                           progress=progress, selection=job.selection)


def _run_map_here(job: ProbeJob, benches, inputs, progress: bool, processor, executor) -> MapResult:
    """The sensitivity map, in this process (its cells share one calibration pass and one dense replay)."""
    remote = executor is not None and executor.remote
    if remote or job.run.executor != "in-process" or job.selection.cells or job.selection.shard or job.selection.merge:
        raise ConfigError("--map runs in this process: drop --executor ray, --cells, --shard and --merge")
    with study_lock(job.out):
        model, processor, calibration, extra = _load_here(job, inputs, processor)
        return run_map_study(model, processor, calibration, benches, job.out, job.map_config, setup_extra=extra,
                             progress=progress)


def _run_remote(job: ProbeJob, executor, inputs, progress: bool) -> StudyResult:
    """The cells as tasks; one task first reads what the setup pins (the model's dtype, the calibration)."""
    task = ProbeCells(job.cell_inputs(), job.config)
    dtype, calibration_ids, batches = executor.call(task.inputs.facts)
    return run_probe_cells(task, job.out, executor, calibration_batches=batches,
                           setup_extra=_setup_extra(job, dtype, calibration_ids, inputs), progress=progress,
                           selection=job.selection)
