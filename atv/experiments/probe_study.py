"""The MoT sensitivity study: prune one pathway with one calibration pool at one sparsity, evaluate,
restore, and repeat over the grid pathway x pool x sparsity (plus the dense baseline).

Results go to a :class:`~atv.experiments.records.ResultLog` (``OUT/results.jsonl``, one fsynced record per
finished cell; ``OUT/study.json`` pins the setup), so an interrupted study re-run with the same
arguments computes only the missing cells.

The model is loaded once: the probe computes exactly the original model while unpruned, and
``reset_`` drops a pruned path's copy, so every cell starts from the dense model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from analysis.tables import probe_table, write_table
from evaluation import Benchmark, load_benchmark
from evaluation.intervals import Bootstrap
from mot_probe.routing import PATHS
from mot_probe.surgery import PROBE_POOLS, attach_probe_, probe_pool
from pruning.config import METHODS, PruneConfig
from pruning.data import check_calibration_paths
from pruning.engine import PruneReport
from pruning.errors import ConfigError
from pruning.io import LoadOptions, dtype_name, resolve_model
from pruning.options import option
from pruning.outputs import check_output_path, write_text_atomic

from .cells import (
    benchmark_inputs,
    check_choices,
    evaluate_all,
    load_reference,
    open_benchmarks,
    open_log,
    run_cells,
    score_cell,
)
from .prune_job import RECIPE, recipe_text
from .records import check_inputs, file_digest, model_inputs, study_lock
from .sensitivity_map import MapConfig, MapResult, run_map_study

log = logging.getLogger(__name__)


@dataclass
class StudyConfig:
    pathways: tuple[str, ...] = option(PATHS, "pruned pathway(s); the other stays dense", choices=PATHS)
    pools: tuple[str, ...] = option(tuple(PROBE_POOLS), "calibration pool(s)", choices=tuple(PROBE_POOLS))
    sparsities: tuple[float, ...] = option((0.5, 0.6), "unstructured sparsities, per output row")
    method: str = option("wanda", "pruner used on the path (one that takes the pool as given)",
                         choices=("wanda", "sparsegpt"))
    seed: int = option(0, "seed of the calibration sampling and the pruner")
    batch_size: int = option(8, "evaluation batch size")
    max_new_tokens: int = option(8, "answer length on open-answer benchmarks")

    def __post_init__(self) -> None:
        self.pathways, self.pools = tuple(self.pathways), tuple(self.pools)
        self.sparsities = tuple(float(s) for s in self.sparsities)
        check_choices("pathway", self.pathways, PATHS)
        for pool in self.pools:
            probe_pool(pool)
        if not self.pools:
            raise ConfigError(f"pools is empty; choose from {list(PROBE_POOLS)}")
        bad_s = [s for s in self.sparsities if not 0.0 < s < 1.0]
        if bad_s or not self.sparsities:
            raise ConfigError(f"sparsities must be in (0, 1), got {list(self.sparsities)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {self.batch_size} and "
                              f"{self.max_new_tokens}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.method not in METHODS or self.method in ("magnitude", "atv", "tamp"):
            raise ConfigError(f"method must use the calibration pool as given: 'wanda' or 'sparsegpt', "
                              f"got {self.method!r}")

    def cells(self) -> list[dict[str, Any]]:
        """The dense baseline first, then the grid in a fixed order."""
        grid = [{"pathway": p, "pool": q, "sparsity": s} for s in self.sparsities for p in self.pathways
                for q in self.pools]
        return [{"pathway": "dense"}] + grid


@dataclass
class StudyResult:
    out_dir: Path
    records: list[dict[str, Any]]
    computed: int                                     # cells computed by this run (the rest were resumed)
    tables: list[Path] = field(default_factory=list)

    @property
    def table(self) -> tuple[list[str], list[list[str]]]:
        return probe_table(self.records)


def run_probe_study(model: nn.Module, processor, calibration: Sequence[Mapping[str, Any]],
                    benchmarks: Iterable[Benchmark | str | Path], out_dir: str | Path,
                    config: StudyConfig | None = None, *, setup_extra: Mapping[str, Any] | None = None,
                    progress: bool = True, on_cell: Callable[[dict[str, Any]], None] | None = None) -> StudyResult:
    """Run (or resume) the probe grid on ``model`` (probed in place, unloaded at the end).

    calibration: model-input batches (with images) for the pruner; benchmarks: harness benchmarks.
    ``setup_extra`` (e.g. model folder, calibration file) joins the pinned setup. ``on_cell`` is
    called with each new record (tests use it to interrupt a run).
    """
    config = config or StudyConfig()
    benches = open_benchmarks(benchmarks)
    with study_lock(out_dir):
        return _run_study(model, processor, calibration, benches, out_dir, config, setup_extra, progress, on_cell)


def _run_study(model, processor, calibration, benches, out_dir, config: StudyConfig, setup_extra, progress: bool,
               on_cell) -> StudyResult:
    results = open_log(out_dir, config, benches, calibration, setup_extra)
    cells = config.cells()
    probe = attach_probe_(model)
    try:
        reference = load_reference(results, model, processor, benches, progress)

        def compute(cell: dict[str, Any], dense: dict[str, Any] | None) -> dict[str, Any]:
            try:
                return score_cell(cell, lambda: _prune_path(probe, calibration, config, cell),
                                  lambda: evaluate_all(model, processor, benches, reference=reference,
                                                       batch_size=config.batch_size,
                                                       max_new_tokens=config.max_new_tokens, progress=progress,
                                                       seed=config.seed, return_items=True), dense, model,
                                  Bootstrap(seed=config.seed))
            finally:
                probe.reset_()

        computed = run_cells(results, cells, compute, desc="probe cells", progress=progress, on_cell=on_cell)
    finally:
        probe.unload()
    result = StudyResult(results.out_dir, results.ordered(cells), computed=computed)
    result.tables = write_table(result.table, "probe_table", results.out_dir)
    return result


def _prune_path(probe, calibration, config: StudyConfig, cell: dict[str, Any]) -> PruneReport | None:
    """Prune the cell's path with its pool (nothing for the dense cell)."""
    if cell["pathway"] == "dense":
        return None
    prune_config = PruneConfig(config.method, sparsity=cell["sparsity"], pool=probe_pool(cell["pool"]),
                               seed=config.seed)
    return probe.prune_path_(cell["pathway"], prune_config, calibration, progress=False)


@dataclass
class ProbeJob:
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

    @property
    def inputs(self) -> tuple[Path, ...]:
        """What the study reads (its folder may never hold one of these)."""
        return (self.model, self.calib, self.images, *self.benchmarks)


def run_probe_job(job: ProbeJob, progress: bool = True, processor=None) -> StudyResult | MapResult:
    """Load the model and the calibration data, then run or resume the study (``atv probe``): the grid, or
    the sensitivity map with ``job.map``."""
    from transformers import set_seed

    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    # every check that needs no model first: benchmark files, paths, the inputs of a study being resumed
    benches = [load_benchmark(path, job.allow_outside_paths) for path in job.benchmarks]
    check_output_path(job.out, job.inputs)
    check_calibration_paths(job.calib, job.images)
    source = resolve_model(job.model)  # a folder with config.json, or a Hub id
    revision = job.load.revision or "main"
    model_print = model_inputs(source) if Path(source).is_dir() else {"model": f"{source}@{revision}"}
    inputs = {**model_print, "calibration file": file_digest(job.calib), **benchmark_inputs(benches)}
    check_inputs(job.out, inputs)
    with study_lock(job.out):
        set_seed(job.config.seed)
        model, loaded = load_model(job.model, job.load, with_processor=processor is None)
        processor = processor if processor is not None else loaded
        calibration, calib_report = load_llava_conversations(job.calib, job.images, processor, job.nsamples,
                                                             job.config.seed, job.max_length,
                                                             allow_outside=job.allow_outside_paths)
        extra = {"model": str(job.model), "calib": str(job.calib), "images": str(job.images),
                 "nsamples": job.nsamples, "max_length": job.max_length, "calib_batch_size": 1,
                 "dtype": dtype_name(model), "calibration_ids": calib_report.ids, "inputs": inputs,
                 **({"revision": job.load.revision} if job.load.revision else {})}
        if job.map:
            result = run_map_study(model, processor, calibration, benches, job.out, job.map_config,
                                   setup_extra=extra, progress=progress)
        else:
            result = run_probe_study(model, processor, calibration, benches, job.out, job.config, setup_extra=extra,
                                     progress=progress)
    if job.recipe is not None:
        write_text_atomic(result.out_dir / RECIPE, recipe_text(job.recipe))
    return result
