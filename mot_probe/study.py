"""The MoT sensitivity study: prune one pathway with one calibration pool at one sparsity, evaluate,
restore, and repeat over the grid pathway x pool x sparsity (plus the dense baseline).

Results go to a :class:`evaluation.records.ResultLog` (``OUT/results.jsonl``, one fsynced record per
finished cell; ``OUT/study.json`` pins the setup), so an interrupted study re-run with the same
arguments computes only the missing cells.

The model is loaded once: the probe computes exactly the original model while unpruned, and
``reset_`` drops a pruned path's copy, so every cell starts from the dense model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from analysis.tables import probe_table, write_table
from evaluation import Benchmark, EvalReport, evaluate, load_benchmark
from evaluation.compare import cell_record, load_reference
from evaluation.records import ResultLog
from pruning.config import METHODS, PruneConfig
from pruning.errors import ConfigError

from .routing import PATHS
from .surgery import PROBE_POOLS, attach_probe_, get_probe, probe_pool

log = logging.getLogger(__name__)

REFERENCE = "fidelity_reference.pt"


@dataclass
class StudyConfig:
    pathways: tuple[str, ...] = PATHS                 # which path is pruned (the other stays dense)
    pools: tuple[str, ...] = tuple(PROBE_POOLS)       # calibration pools: text | visual | mixed
    sparsities: tuple[float, ...] = (0.5, 0.6)        # unstructured, per output row
    method: str = "wanda"                             # pruner used on the path (any activation-based one)
    seed: int = 0
    batch_size: int = 8                               # evaluation batch
    max_new_tokens: int = 8                           # open-answer benchmarks

    def __post_init__(self) -> None:
        self.pathways, self.pools = tuple(self.pathways), tuple(self.pools)
        self.sparsities = tuple(float(s) for s in self.sparsities)
        bad = [p for p in self.pathways if p not in PATHS]
        if bad or not self.pathways:
            raise ConfigError(f"unknown pathway {bad or '(none)'}; choose from {PATHS}")
        for pool in self.pools:
            probe_pool(pool)
        if not self.pools:
            raise ConfigError(f"pools is empty; choose from {list(PROBE_POOLS)}")
        bad_s = [s for s in self.sparsities if not 0.0 < s < 1.0]
        if bad_s or not self.sparsities:
            raise ConfigError(f"sparsities must be in (0, 1), got {list(self.sparsities)}")
        if self.method not in METHODS or self.method in ("magnitude", "atv", "tamp"):
            raise ConfigError(f"method must use the calibration pool as given: 'wanda' or 'sparsegpt', got {self.method!r}")

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
    out_dir = Path(out_dir)
    benches = [b if isinstance(b, Benchmark) or hasattr(b, "evaluate") else load_benchmark(b) for b in benchmarks]
    setup = {"config": asdict(config), "benchmarks": [b.name for b in benches],
             "calibration_batches": len(calibration), **dict(setup_extra or {})}
    results = ResultLog(out_dir, setup)
    cells = config.cells()
    todo = [c for c in cells if not results.done(c)]
    probe = attach_probe_(model)
    try:
        reference = load_reference(out_dir / REFERENCE, model, processor, benches, progress)
        for cell in tqdm(todo, desc="probe cells", disable=not progress):
            dense = results.find(cells[0])
            record = _run_cell(model, processor, calibration, benches, reference, config, cell, dense, progress)
            results.append(record)
            if on_cell is not None:
                on_cell(record)
    finally:
        probe.unload()
    result = StudyResult(out_dir, results.ordered(cells), computed=len(todo))
    result.tables = write_table(result.table, "probe_table", out_dir)
    return result


def _run_cell(model, processor, calibration, benches, reference, config: StudyConfig, cell: dict[str, Any],
              dense: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    probe, prune_summary = get_probe(model), None
    if cell["pathway"] != "dense":
        prune_config = PruneConfig(config.method, sparsity=cell["sparsity"], pool=probe_pool(cell["pool"]),
                                   seed=config.seed)
        report = probe.prune_path_(cell["pathway"], prune_config, calibration, progress=False)
        prune_summary = {"mean_sparsity": report.sparsity, "seconds": report.seconds,
                         "pooled_tokens": [layer.pooled_tokens for layer in report.layers]}
    try:
        scores = _evaluate(model, processor, benches, reference=reference, batch_size=config.batch_size,
                           max_new_tokens=config.max_new_tokens, progress=progress, seed=config.seed)
    finally:
        probe.reset_()
    return cell_record(cell, scores, prune_summary, dense, time.perf_counter() - start)


def _evaluate(model, processor, benches, **kwargs) -> EvalReport:
    """The harness on Benchmark objects; any other benchmark scores itself with ``evaluate(model, processor)``
    -> BenchmarkResult (e.g. ``evaluation.lmms_bridge.LmmsTask``: an lmms-eval task through the bridge)."""
    own = [b for b in benches if isinstance(b, Benchmark)]
    report = evaluate(model, processor, own, **kwargs) if own else None
    results = [report[b.name] if isinstance(b, Benchmark) else b.evaluate(model, processor) for b in benches]
    return EvalReport(results, seed=kwargs.get("seed", 0))


@dataclass
class ProbeJob:
    model: Path                        # HF vision-language model folder (with processor)
    calib: Path                        # LLaVA-conversation JSON/JSONL for the pruner
    images: Path                       # image folder of the calibration records
    benchmarks: tuple[Path, ...]       # harness JSONL files
    out: Path                          # study folder (results.jsonl, probe_table.*)
    config: StudyConfig = field(default_factory=StudyConfig)
    nsamples: int = 128
    max_length: int | None = None
    dtype: str = "float32"
    device: str | None = None


def run_probe_job(job: ProbeJob, progress: bool = True, processor=None) -> StudyResult:
    """Load the model and the calibration data, then run or resume the study (``atv probe``)."""
    from pruning.data import load_llava_conversations
    from pruning.io import load_model
    from transformers import set_seed

    benches = [load_benchmark(path) for path in job.benchmarks]  # bad benchmark files fail before any loading
    set_seed(job.config.seed)
    model, loaded = load_model(job.model, job.dtype, job.device, with_processor=processor is None)
    processor = processor if processor is not None else loaded
    calibration, _ = load_llava_conversations(job.calib, job.images, processor, job.nsamples, job.config.seed,
                                              job.max_length)
    extra = {"model": str(job.model), "calib": str(job.calib), "images": str(job.images), "nsamples": job.nsamples,
             "max_length": job.max_length, "calib_batch_size": 1, "dtype": job.dtype}
    return run_probe_study(model, processor, calibration, benches, job.out, job.config, setup_extra=extra,
                           progress=progress)
