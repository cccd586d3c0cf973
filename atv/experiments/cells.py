"""What every grid (probe study, method comparison) shares: the pinned setup, the cell loop, the cell
runner, the record schema, and the dense fidelity reference.

A record (one JSON line per finished cell)::

    {"cell": {...}, "scores": {bench: %}, "metrics": {bench: {...}}, "prune": {...} | None,
     "retention": {bench: % of dense}, "mean_retention": float, "seconds": float,
     "items": {bench: {"ids": digest, "scores": [item score in [0, 1], ...]}},
     "intervals": {"method", "level", "resamples", "seed", "scores": {bench: [low, high]},
                   "retention": {bench: [low, high]}, "mean_retention": [low, high]}}

Retention is against the grid's dense cell, over the benchmarks the dense model scores above 0. ``items``
keeps each benchmark's per-item scores in item order (``ids`` fingerprints that order), so intervals can be
recomputed and two cells compared item by item; ``intervals`` are 95% percentile-bootstrap intervals over
items (:mod:`evaluation.intervals`), retention resampled together with the dense record's items. Records
written before per-item scores were kept have neither entry; a retention interval needs the items of both
the cell and its dense record (the mean's interval those of every benchmark).
"""

from __future__ import annotations

import hashlib
import pickle
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from evaluation import Benchmark, EvalReport, defined_retention, evaluate, load_benchmark
from evaluation.harness import FidelityReference, fidelity_reference
from evaluation.intervals import DEFAULT_BOOTSTRAP, Bootstrap, retention_intervals, score_interval
from pruning.engine import PruneReport
from pruning.errors import ConfigError, ToolkitError

from .records import ResultLog, file_digest
from .share import environment

REFERENCE = "fidelity_reference.pt"


def check_choices(label: str, values: Sequence[Any], allowed: Iterable[Any]) -> None:
    """Refuse an empty selection or a value outside ``allowed``, naming both."""
    allowed = list(allowed)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"unknown {label} {bad or '(none)'}; choose from {allowed}")


def open_benchmarks(benchmarks: Iterable[Benchmark | str | Path]) -> list[Benchmark]:
    """Benchmark objects as given (harness benchmarks or anything with ``evaluate``), files loaded."""
    return [b if isinstance(b, Benchmark) or hasattr(b, "evaluate") else load_benchmark(b) for b in benchmarks]


def benchmark_inputs(benches: Sequence[Any]) -> dict[str, str]:
    """Fingerprints of the benchmark files and of each one's images (benchmarks without a file: none)."""
    inputs = {}
    for bench in benches:
        path = getattr(bench, "path", None)
        if isinstance(bench, Benchmark) and path is not None:
            inputs[f"benchmark {path}"] = file_digest(path)
            images = sorted({str(item.image) for item in bench.items if item.image is not None})
            inputs[f"images of benchmark {path}"] = hashlib.sha256(
                "".join(f"{image}:{file_digest(image)};" for image in images).encode()).hexdigest()
    return inputs


def open_log(out_dir: str | Path, config: Any, benches: Sequence[Benchmark], calibration: Sequence[Any],
             extra: Mapping[str, Any] | None) -> ResultLog:
    """The study folder's result log, its setup checked: the grid config, the benchmarks, the calibration
    batches and ``extra`` (model folder, calibration file, ...); ``inputs`` holds the benchmarks'
    fingerprints and those in ``extra["inputs"]`` (model, calibration file)."""
    extra = dict(extra or {})
    inputs = {**benchmark_inputs(benches), **extra.pop("inputs", {})}
    setup = {"config": asdict(config), "benchmarks": [b.name for b in benches],
             "calibration_batches": len(calibration), **extra, "inputs": inputs}
    return ResultLog(out_dir, setup)


def run_cells(results: ResultLog, cells: list[dict[str, Any]], compute: Callable[[dict, dict | None], dict], *,
              desc: str, progress: bool, on_cell: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Compute the cells without a record, in order; ``compute(cell, dense_record)`` returns the record,
    appended (fsynced) at once. ``cells[0]`` is the dense cell. Returns how many were computed."""
    todo = [c for c in cells if not results.done(c)]
    for cell in tqdm(todo, desc=desc, disable=not progress):
        record = compute(cell, results.find(cells[0]))
        results.append(record)
        if on_cell is not None:
            on_cell(record)
    return len(todo)


def prune_summary(report: PruneReport) -> dict[str, Any]:
    """What a record keeps of a prune report."""
    return {"mean_sparsity": report.sparsity, "seconds": report.seconds, "config": report.config,
            "pooled_tokens": [layer.pooled_tokens for layer in report.layers],
            "k_per_layer": [sum(layer.k_per_sample) for layer in report.layers]}


def score_cell(cell: Mapping[str, Any], prune: Callable[[], PruneReport | None], score: Callable[[], EvalReport],
               dense: Mapping[str, Any] | None, model: nn.Module,
               boot: Bootstrap = DEFAULT_BOOTSTRAP) -> dict[str, Any]:
    """Run one cell: ``prune()`` (None for the dense cell), then ``score()``, into a record that also says
    what it was computed with (library versions, device, dtype)."""
    start = time.perf_counter()
    report = prune()
    scores = score()
    record = cell_record(cell, scores, None if report is None else prune_summary(report), dense,
                         time.perf_counter() - start, boot)
    record["environment"] = environment(model)
    return record


def cell_record(cell: Mapping[str, Any], scores: EvalReport | Mapping[str, float], prune: dict[str, Any] | None,
                dense: Mapping[str, Any] | None, seconds: float = 0.0,
                boot: Bootstrap = DEFAULT_BOOTSTRAP) -> dict[str, Any]:
    """One grid cell's record; retention is against the ``dense`` record (the cell itself when None). With an
    EvalReport that kept per-item results the record holds them and the intervals they give."""
    if isinstance(scores, EvalReport):
        values, metrics = scores.scores(), {r.name: r.metrics for r in scores.results}
    else:
        values, metrics = dict(scores), {}
    record: dict[str, Any] = {"cell": dict(cell), "scores": values, "metrics": metrics, "prune": prune}
    kept = defined_retention(values, (dense or record)["scores"])
    if kept is None:
        raise ToolkitError("the dense model scores 0 on every benchmark: retention is undefined")
    record.update(retention=kept.per_benchmark, mean_retention=kept.mean, seconds=seconds)
    if isinstance(scores, EvalReport) and any(r.items for r in scores.results):
        record["items"] = {r.name: _compact_items(r.items) for r in scores.results if r.items}
        record["intervals"] = record_intervals(record, dense or record, boot)
    return record


# -- per-item scores and their intervals ------------------------------------------------------------------
ITEM_DIGITS = 6  # item scores are kept to 6 decimals (0/1 as integers): the log stays small


def _compact_items(items: Sequence[Any]) -> dict[str, Any]:
    ids = "\n".join(str(item.id) for item in items)
    scores = [int(i.score) if i.score in (0.0, 1.0) else round(i.score, ITEM_DIGITS) for i in items]
    return {"ids": hashlib.sha256(ids.encode("utf-8")).hexdigest()[:16], "scores": scores}


def record_items(record: Mapping[str, Any]) -> dict[str, list[float]]:
    """Benchmark -> per-item scores of a record (empty for a record written without them)."""
    return {name: entry["scores"] for name, entry in (record.get("items") or {}).items()}


def paired_items(record: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """The benchmarks both records hold the same items of (same ids in the same order)."""
    mine, theirs = record.get("items") or {}, other.get("items") or {}
    return [name for name in mine if name in theirs and mine[name]["ids"] == theirs[name]["ids"]]


def record_intervals(record: Mapping[str, Any], dense: Mapping[str, Any], boot: Bootstrap = DEFAULT_BOOTSTRAP
                     ) -> dict[str, Any]:
    """Score intervals of every benchmark with items; retention intervals of those the dense record holds
    the same items of, and the mean retention's interval when that covers every retention benchmark."""
    items = record_items(record)
    dense_items = record_items(dense)
    out: dict[str, Any] = {**boot.to_dict(),
                           "scores": {name: score_interval(s, name, boot).to_list() for name, s in items.items()}}
    paired = [name for name in paired_items(record, dense) if name in record["retention"]]
    if paired:
        kept = retention_intervals({n: items[n] for n in paired}, {n: dense_items[n] for n in paired}, boot)
        out["retention"] = {n: None if i is None else i.to_list() for n, i in kept.per_benchmark.items()}
        if set(paired) == set(record["retention"]) and kept.mean is not None:
            out["mean_retention"] = kept.mean.to_list()
    return out


def evaluate_all(model: nn.Module, processor, benches: Sequence[Any], **kwargs) -> EvalReport:
    """The harness on Benchmark objects; any other benchmark scores itself with ``evaluate(model, processor)``
    -> BenchmarkResult (e.g. ``evaluation.lmms_bridge.LmmsTask``: an lmms-eval task through the bridge)."""
    own = [b for b in benches if isinstance(b, Benchmark)]
    report = evaluate(model, processor, own, **kwargs) if own else None
    results = [report[b.name] if isinstance(b, Benchmark) else b.evaluate(model, processor) for b in benches]
    return EvalReport(results, seed=kwargs.get("seed", 0))


def load_reference(results: ResultLog, model: nn.Module, processor, benches: Sequence[Any],
                   progress: bool) -> FidelityReference | None:
    """The dense model's fidelity reference, computed once and kept in the study folder (the setup is pinned
    before it is written)."""
    fidelity = [b for b in benches if getattr(b, "kind", None) == "fidelity"]
    if not fidelity:
        return None
    path = results.out_dir / REFERENCE
    if path.is_file():
        try:
            return FidelityReference.load(path)
        except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
            raise ToolkitError(f"{path} is corrupt ({type(err).__name__}); delete it to recompute the dense "
                               "reference, or choose another --out") from None
    reference = fidelity_reference(model, processor, fidelity, progress=progress)
    results.pin()
    tmp = path.with_suffix(".partial")
    reference.save(tmp)
    tmp.replace(path)
    return reference
