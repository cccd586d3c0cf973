"""Compare pruning methods on the real, shared weights: prune a fresh dense model per cell
(method x setting), evaluate, and log one record per cell (resumable, like the probe study).

A setting is a sparsity (``"50%"``) or an N:M pattern (``"2:4"``). Records::

    {"cell": {"method": "atv", "setting": "2:4"}, "scores": {...}, "retention": {...},
     "mean_retention": 97.1, "prune": {"mean_sparsity": 0.5, "seconds": 12.3, ...}}

with the dense baseline as ``{"method": "dense", "setting": "dense"}``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from pruning.config import METHODS, PruneConfig, parse_pattern
from pruning.engine import prune_
from pruning.errors import ConfigError, ToolkitError

from evaluation.benchmarks import Benchmark, load_benchmark
from evaluation.harness import FidelityReference, evaluate, fidelity_reference
from .records import ResultLog
from evaluation.reports import EvalReport, RetentionReport, retention

log = logging.getLogger(__name__)

DENSE = {"method": "dense", "setting": "dense"}


def setting_config(method: str, setting: str, seed: int = 0) -> PruneConfig:
    """'50%' -> sparsity 0.5; '2:4' -> the N:M pattern."""
    if ":" in setting:
        return PruneConfig(method, pattern=setting, seed=seed)
    try:
        value = float(setting.rstrip("%")) / (100 if setting.endswith("%") else 1)
    except ValueError:
        raise ConfigError(f"setting must be a sparsity like '50%' / '0.5' or a pattern like '2:4', got {setting!r}") from None
    return PruneConfig(method, sparsity=value, seed=seed)


@dataclass
class CompareConfig:
    methods: tuple[str, ...] = ("atv", "wanda", "sparsegpt", "magnitude")
    settings: tuple[str, ...] = ("50%", "60%", "2:4")
    seed: int = 0
    batch_size: int = 8                               # evaluation batch
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        self.methods, self.settings = tuple(self.methods), tuple(self.settings)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"unknown method {bad or '(none)'}; choose from {sorted(METHODS)}")
        if not self.settings:
            raise ConfigError("settings is empty; e.g. '50%' or '2:4'")
        for setting in self.settings:
            setting_config("magnitude", setting)      # validates
            if ":" in setting:
                parse_pattern(setting)

    def cells(self) -> list[dict[str, str]]:
        return [dict(DENSE)] + [{"method": m, "setting": s} for s in self.settings for m in self.methods]


@dataclass
class CompareResult:
    out_dir: Path
    records: list[dict[str, Any]]
    computed: int
    tables: list[Path] = field(default_factory=list)


def defined_retention(scores: Mapping[str, float], dense: Mapping[str, float]) -> RetentionReport:
    """Retention over the benchmarks where the dense model scores above 0 (others are undefined)."""
    defined = [name for name, value in dense.items() if value > 0]
    if len(defined) < len(dense):
        log.warning("retention undefined where the dense score is 0: %s", sorted(set(dense) - set(defined)))
    if not defined:
        raise ToolkitError("the dense model scores 0 on every benchmark: retention is undefined")
    return retention({n: scores[n] for n in defined}, {n: dense[n] for n in defined})


def load_reference(path: Path, model: nn.Module, processor, benches: list[Benchmark],
                   progress: bool) -> FidelityReference | None:
    """The dense model's fidelity reference, computed once and kept at ``path``."""
    fidelity = [b for b in benches if b.kind == "fidelity"]
    if not fidelity:
        return None
    if path.is_file():
        return FidelityReference.load(path)
    reference = fidelity_reference(model, processor, fidelity, progress=progress)
    tmp = path.with_suffix(".partial")
    reference.save(tmp)
    tmp.replace(path)
    return reference


def run_method_comparison(make_model: Callable[[], nn.Module], processor, calibration: Sequence[Mapping[str, Any]],
                          benchmarks: Iterable[Benchmark | str | Path], out_dir: str | Path,
                          config: CompareConfig | None = None, *, setup_extra: Mapping[str, Any] | None = None,
                          progress: bool = True, dense_record: Mapping[str, Any] | None = None) -> CompareResult:
    """Run (or resume) the method x setting grid; ``make_model()`` returns a fresh dense model each call.

    ``dense_record``: the dense model's record from another study on the same benchmarks (e.g. the probe
    study's dense cell), reused instead of evaluating the dense model again."""
    from analysis.tables import scores_table, write_table

    config = config or CompareConfig()
    benches = [b if isinstance(b, Benchmark) else load_benchmark(b) for b in benchmarks]
    setup = {"config": asdict(config), "benchmarks": [b.name for b in benches],
             "calibration_batches": len(calibration), **dict(setup_extra or {})}
    results = ResultLog(out_dir, setup)
    cells = config.cells()
    if dense_record is not None and not results.done(cells[0]):
        if sorted(dense_record["scores"]) != sorted(b.name for b in benches):
            raise ConfigError(f"dense_record scores {sorted(dense_record['scores'])} are not these benchmarks "
                              f"{[b.name for b in benches]}")
        results.append({**dense_record, "cell": dict(DENSE), "prune": None})
    todo = [c for c in cells if not results.done(c)]
    reference = None
    for cell in tqdm(todo, desc="method cells", disable=not progress):
        model = make_model()
        if reference is None:
            reference = load_reference(results.out_dir / "fidelity_reference.pt", model, processor, benches, progress)
        results.append(_run_cell(model, processor, calibration, benches, reference, config, cell,
                                 results.find(cells[0]), progress))
        del model
    records = results.ordered(cells)
    out = CompareResult(results.out_dir, records, computed=len(todo))
    label = lambda r: f"{r['cell']['method']} {r['cell']['setting']}"  # noqa: E731
    out.tables = write_table(scores_table(records, label), "method_scores", results.out_dir)
    return out


def _run_cell(model, processor, calibration, benches, reference, config: CompareConfig, cell: dict[str, str],
              dense: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    summary = None
    if cell["method"] != "dense":
        prune_config = setting_config(cell["method"], cell["setting"], config.seed)
        report = prune_(model, prune_config, calibration if prune_config.needs_calibration else (), progress=False)
        summary = {"mean_sparsity": report.sparsity, "seconds": report.seconds, "config": report.config,
                   "k_per_layer": [sum(layer.k_per_sample) for layer in report.layers]}
    scores = evaluate(model, processor, benches, reference=reference, batch_size=config.batch_size,
                      max_new_tokens=config.max_new_tokens, progress=progress, seed=config.seed)
    return cell_record(cell, scores, summary, dense, time.perf_counter() - start)


def cell_record(cell: Mapping[str, Any], scores: EvalReport, prune: dict[str, Any] | None,
                dense: Mapping[str, Any] | None, seconds: float) -> dict[str, Any]:
    """One grid cell's result record; retention is against ``dense`` (the cell itself when None)."""
    record: dict[str, Any] = {"cell": dict(cell), "scores": scores.scores(),
                              "metrics": {r.name: r.metrics for r in scores.results}, "prune": prune}
    kept = defined_retention(record["scores"], (dense or record)["scores"])
    record.update(retention=kept.per_benchmark, mean_retention=kept.mean, seconds=seconds)
    return record
