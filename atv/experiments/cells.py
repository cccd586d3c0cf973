"""What every grid (probe study, method comparison) shares: the pinned setup, the cell loop, the cell
runner, the record schema, the cell selection (patterns, shards), the inputs a worker loads, and the
dense fidelity reference.

A cell is *measured* (where an executor runs it), then *recorded* by the driver::

    measurement: {"cell": {...}, "scores": {bench: %}, "metrics": {bench: {...}}, "prune": {...} | None,
                  "seconds": float, "environment": {...},
                  "items": {bench: {"ids": digest, "scores": [item score in [0, 1], ...]}}, "bootstrap": {...}}
    record:      {"cell", "scores", "metrics", "prune", "retention": {bench: % of dense}, "mean_retention",
                  "seconds", "items", "intervals": {"method", "level", "resamples", "seed",
                  "scores": {bench: [low, high]}, "retention": {bench: [low, high]}, "mean_retention": [low, high]},
                  "environment"}

Retention is against the grid's dense cell, over the benchmarks the dense model scores above 0. ``items``
keeps each benchmark's per-item scores in item order (``ids`` fingerprints that order), so intervals can be
recomputed and two cells compared item by item; ``intervals`` are 95% percentile-bootstrap intervals over
items (:mod:`evaluation.intervals`), retention resampled together with the dense record's items. Records
written before per-item scores were kept have neither entry; a retention interval needs the items of both
the cell and its dense record (the mean's interval those of every benchmark). A cell's name joins its
values with '/': ``text/visual/0.5`` (pathway/pool/sparsity) or ``dense`` in a probe study, ``atv/50%``
(method/setting) in a method comparison.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from evaluation import Benchmark, EvalReport, defined_retention, evaluate, load_benchmark
from evaluation.harness import FidelityReference, fidelity_reference
from evaluation.intervals import DEFAULT_BOOTSTRAP, Bootstrap, retention_intervals, score_interval
from mot_probe.routing import PATHS
from pruning.engine import PruneReport
from pruning.errors import ConfigError, ToolkitError
from pruning.io import LoadOptions
from pruning.options import SEED_RANGE, check_fields, option

from .executors import InProcess, Measure, RayExecutor
from .records import RESULTS, ResultLog, Shard, cell_key, file_digest, prints_differ
from .share import environment

REFERENCE = "fidelity_reference.pt"


PATH_METHODS = ("wanda", "sparsegpt")  # pruners that take the calibration pool as given (a cell's pool)


@dataclass
class StudySettings:
    """What the probe grid (:class:`~atv.experiments.probe_study.StudyConfig`) and the sensitivity map
    (:class:`~atv.experiments.sensitivity_map.MapConfig`) share: the pruned pathways, the pruner, the seed and
    how cells are evaluated. Checked by :func:`pruning.options.check_fields`, like every setting of both."""

    pathways: tuple[str, ...] = option(PATHS, "pruned pathway(s); the other stays dense", choices=PATHS,
                                       label="pathway")
    method: str = option("wanda", "pruner used on the path (one that takes the pool as given)",
                         choices=PATH_METHODS)
    seed: int = option(0, "seed of the calibration sampling and the pruner", within=SEED_RANGE)
    batch_size: int = option(8, "evaluation batch size", within=">= 1")
    max_new_tokens: int = option(8, "answer length on open-answer benchmarks", within=">= 1")

    def __post_init__(self) -> None:
        check_fields(self)


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


def open_log(out_dir: str | Path, config: Any, benches: Sequence[Benchmark], calibration_batches: int,
             extra: Mapping[str, Any] | None, shard: Shard | None = None) -> ResultLog:
    """The study folder's result log, its setup checked: the grid config, the benchmarks, the number of
    calibration batches and ``extra`` (model folder, calibration file, ...); ``inputs`` holds the
    benchmarks' fingerprints and those in ``extra["inputs"]`` (model, calibration file)."""
    extra = dict(extra or {})
    inputs = {**benchmark_inputs(benches), **extra.pop("inputs", {})}
    setup = {"config": asdict(config), "benchmarks": [b.name for b in benches],
             "calibration_batches": calibration_batches, **extra, "inputs": inputs}
    return ResultLog(out_dir, setup, shard)


# -- which cells a run computes -------------------------------------------------------------------------
def cell_name(cell: Mapping[str, Any]) -> str:
    """``{"pathway": "text", "pool": "visual", "sparsity": 0.5}`` -> ``'text/visual/0.5'``."""
    return "/".join(str(value) for value in cell.values())


@dataclass
class CellSelection:
    """Which cells of a grid this run computes, and where it writes them."""

    cells: tuple[str, ...] = option((), "only the cells whose name matches one of these patterns (fnmatch: "
                                        "'text/*/0.5', 'visual/mixed/*', 'dense'; a name is pathway/pool/sparsity)",
                                    metavar="PATTERN")
    shard: str | None = option(None, "compute shard I of N of the (selected) cells into "
                                     "OUT/records.shard-I-of-N.jsonl (e.g. one job of a Slurm array); every shard "
                                     "gets the same other options", metavar="I/N")
    merge: bool = option(False, "compute nothing: read every shard's records into results.jsonl and write the "
                                "table (needs no model)")

    def __post_init__(self) -> None:
        self.cells = tuple(self.cells)
        self.part = None if self.shard is None else Shard.parse(self.shard)
        if self.merge and (self.cells or self.part):
            raise ConfigError("--merge computes nothing: drop --cells and --shard (a run with them computes cells)")
        bad = [p for p in self.cells if not p.strip()]
        if bad:
            raise ConfigError(f"--cells patterns must not be empty, got {list(self.cells)}")

    def matching(self, cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The cells whose name matches a pattern (all without patterns), in grid order; none is an error."""
        chosen = [dict(c) for c in cells if not self.cells or any(fnmatch.fnmatchcase(cell_name(c), p)
                                                                   for p in self.cells)]
        if not chosen:
            names = ", ".join(cell_name(c) for c in cells[:4])
            raise ConfigError(f"--cells {' '.join(self.cells)} matches no cell of this grid; cells are named like "
                              f"{names}, ...")
        return chosen

    def pick(self, cells: Sequence[Mapping[str, Any]], results: ResultLog) -> list[dict[str, Any]]:
        """The cells of this run, in grid order (``cells[0]`` is the dense one): the matching ones, this shard's
        share of them (every n-th from the shard's index). On the whole log the dense cell is always included
        while it has no record: every record's retention needs it."""
        if self.merge:
            return []
        chosen = self.matching(cells)
        if self.part is not None:
            return [c for i, c in enumerate(chosen) if self.part.holds(i)]
        if cells[0] not in chosen and not results.done(cells[0]):
            chosen.insert(0, dict(cells[0]))
        return chosen


# -- the cell loop ------------------------------------------------------------------------------------
def run_cells(results: ResultLog, cells: list[dict[str, Any]], measure: Measure | None, shared: Any = None, *,
              desc: str, progress: bool, on_cell: Callable[[dict[str, Any]], None] | None = None,
              executor: InProcess | RayExecutor | None = None, selection: CellSelection | None = None,
              record: Callable[[Mapping[str, Any], Mapping[str, Any] | None], dict[str, Any]] | None = None) -> int:
    """Compute the selected cells that have no record yet: ``executor.map(measure, todo, shared)`` yields
    their measurements (in-process: in grid order); each is appended (fsynced) as it arrives: as a complete
    record on the whole log, as a measurement in a shard's file. ``cells[0]`` is the dense cell; records
    measured before it wait for it. On the whole log, shards' measurements are merged in first. Returns
    how many cells were computed; ``on_cell`` is called with each new record."""
    check_log_cells(results, cells)
    writer = _Writer(results, cells[0], on_cell, record or complete_record)
    if results.shard is None:
        writer.merge(cells)
    chosen = list(cells) if selection is None else selection.pick(cells, results)
    todo = [c for c in chosen if not results.done(c)]
    if todo and measure is None:
        raise ToolkitError(f"{len(todo)} cells to compute but no cell runner was given")
    executor = executor or InProcess()
    measured = executor.map(measure, todo, shared)
    try:
        with tqdm(total=len(todo), desc=desc, disable=not progress) as bar:
            for measurement in measured:
                writer.add(measurement, new=True)
                bar.update()
    finally:
        if hasattr(measured, "close"):  # a generator stopped early drops its pending cells
            measured.close()
    return len(todo)


def check_log_cells(results: ResultLog, cells: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a results.jsonl that holds two records of one cell, or a record of a cell outside the study's
    grid (an edited or foreign line): the study would resume on, and tabulate, one of them silently."""
    grid, seen = {cell_key(c) for c in cells}, set()
    for n, record in enumerate(results.records, 1):
        key = cell_key(record["cell"])
        if key not in grid:
            raise ToolkitError(f"{results.out_dir / RESULTS}: record {n} is of cell {record['cell']}, which is not "
                               "in this study's grid; delete that line or use a new --out")
        if key in seen:
            raise ToolkitError(f"{results.out_dir / RESULTS}: record {n} is a second record of cell "
                               f"{record['cell']}; delete one of them or use a new --out")
        seen.add(key)


class _Writer:
    """The driver's single writer: a measurement becomes a record (retention against the dense cell) in
    results.jsonl, or stays a measurement in a shard's file."""

    def __init__(self, results: ResultLog, dense_cell: Mapping[str, Any], on_cell, record) -> None:
        self.results, self.on_cell, self.record = results, on_cell, record
        self.dense_key = cell_key(dense_cell)
        self.dense = results.find(dense_cell)
        self.waiting: list[tuple[dict[str, Any], bool]] = []  # measured before the dense cell had a record

    def add(self, measurement: dict[str, Any], new: bool) -> None:
        if self.results.shard is not None:
            self._write(measurement, new)
        elif cell_key(measurement["cell"]) == self.dense_key:
            self.dense = self.record(measurement, None)
            self._write(self.dense, new)
            waiting, self.waiting = self.waiting, []
            for held, held_new in waiting:
                self._write(self.record(held, self.dense), held_new)
        elif self.dense is None:
            self.waiting.append((measurement, new))
        else:
            self._write(self.record(measurement, self.dense), new)

    def _write(self, record: dict[str, Any], new: bool) -> None:
        self.results.append(record)
        if new and self.on_cell is not None:
            self.on_cell(record)

    def merge(self, cells: Sequence[Mapping[str, Any]]) -> None:
        """The shards' measurements of cells without a record, in grid order (the dense cell first)."""
        for cell in cells:
            held = self.results.measured.get(cell_key(cell))
            if held is not None and self.results.find(cell) is None:
                self.add(held, new=False)


def prune_summary(report: PruneReport) -> dict[str, Any]:
    """What a record keeps of a prune report."""
    return {"mean_sparsity": report.sparsity, "seconds": report.seconds, "config": report.config,
            "pooled_tokens": [layer.pooled_tokens for layer in report.layers],
            "k_per_layer": [sum(layer.k_per_sample) for layer in report.layers]}


def measure_cell(cell: Mapping[str, Any], prune: Callable[[], PruneReport | None], score: Callable[[], EvalReport],
                 model: nn.Module, boot: Bootstrap = DEFAULT_BOOTSTRAP) -> dict[str, Any]:
    """Run one cell: ``prune()`` (None for the dense cell), then ``score()``, into a measurement that also
    says what it was computed with (library versions, device, dtype), its per-item scores when the report
    kept them, and how the driver draws their intervals (``boot``)."""
    start = time.perf_counter()
    report = prune()
    entry = scores_entry(score(), boot)
    return {"cell": dict(cell), "scores": entry.pop("scores"), "metrics": entry.pop("metrics"),
            "prune": None if report is None else prune_summary(report), "seconds": time.perf_counter() - start,
            "environment": environment(model), **entry}


def scores_entry(scores: EvalReport, boot: Bootstrap = DEFAULT_BOOTSTRAP) -> dict[str, Any]:
    """A measurement's benchmark part: ``scores``, ``metrics``, and, when the report kept them, the per-item
    scores (``items``) and how the driver draws their intervals (``bootstrap``)."""
    out: dict[str, Any] = {"scores": scores.scores(), "metrics": {r.name: r.metrics for r in scores.results}}
    if any(r.items for r in scores.results):
        out["items"] = {r.name: compact_items(r.items) for r in scores.results if r.items}
        out["bootstrap"] = {"level": boot.level, "resamples": boot.resamples, "seed": boot.seed}
    return out


def complete_record(measurement: Mapping[str, Any], dense: Mapping[str, Any] | None) -> dict[str, Any]:
    """A measurement as a record, retention against the ``dense`` record (the cell itself when None), with
    the intervals of its per-item scores when it kept them."""
    record = cell_record(measurement["cell"], measurement["scores"], measurement["prune"], dense,
                         measurement["seconds"])
    record["metrics"] = measurement["metrics"]
    if "items" in measurement:
        record["items"] = measurement["items"]
        boot = Bootstrap(**measurement.get("bootstrap", {}))
        record["intervals"] = record_intervals(record, dense or record, boot)
    record["environment"] = measurement["environment"]
    return record


def score_cell(cell: Mapping[str, Any], prune: Callable[[], PruneReport | None], score: Callable[[], EvalReport],
               dense: Mapping[str, Any] | None, model: nn.Module,
               boot: Bootstrap = DEFAULT_BOOTSTRAP) -> dict[str, Any]:
    """:func:`measure_cell`, recorded against ``dense``."""
    return complete_record(measure_cell(cell, prune, score, model, boot), dense)


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
        record["items"] = {r.name: compact_items(r.items) for r in scores.results if r.items}
        record["intervals"] = record_intervals(record, dense or record, boot)
    return record


# -- per-item scores and their intervals ------------------------------------------------------------------
ITEM_DIGITS = 6  # item scores are kept to 6 decimals (0/1 as integers): the log stays small


def compact_items(items: Sequence[Any]) -> dict[str, Any]:
    ids = "\n".join(str(item.id) for item in items)
    scores = [int(i.score) if i.score in (0.0, 1.0) else round(i.score, ITEM_DIGITS) for i in items]
    return {"ids": hashlib.sha256(ids.encode("utf-8")).hexdigest()[:16], "scores": scores}


def record_items(record: Mapping[str, Any]) -> dict[str, list[float]]:
    """Benchmark -> per-item scores of a record (empty for a record written without them)."""
    return {name: entry["scores"] for name, entry in (record.get("items") or {}).items()}


def paired_items(record: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """The benchmarks both records hold the same items of (same ids in the same order, as many scores)."""
    mine, theirs = record.get("items") or {}, other.get("items") or {}
    return [name for name in mine if name in theirs and mine[name]["ids"] == theirs[name]["ids"]
            and len(mine[name]["scores"]) == len(theirs[name]["scores"])]


def record_intervals(record: Mapping[str, Any], dense: Mapping[str, Any], boot: Bootstrap = DEFAULT_BOOTSTRAP
                     ) -> dict[str, Any]:
    """Score intervals of every benchmark with items; retention intervals of those the dense record holds
    the same items of, and the mean retention's interval when that covers every retention benchmark."""
    scores = {name: score_interval(s, name, boot).to_list() for name, s in record_items(record).items()}
    return {**boot.to_dict(), "scores": scores, **paired_retention(record, dense, boot)}


def paired_retention(record: Mapping[str, Any], dense: Mapping[str, Any], boot: Bootstrap = DEFAULT_BOOTSTRAP
                     ) -> dict[str, Any]:
    """``{"retention": {bench: [low, high]}, "mean_retention": [low, high]}`` of a record ("items",
    "retention") against the dense one's "items": per retention benchmark both hold the same items of (none
    of them: ``{}``), and the mean when that covers every retention benchmark."""
    items, dense_items = record_items(record), record_items(dense)
    paired = [name for name in paired_items(record, dense) if name in record["retention"]]
    if not paired:
        return {}
    kept = retention_intervals({n: items[n] for n in paired}, {n: dense_items[n] for n in paired}, boot)
    out: dict[str, Any] = {"retention": {n: None if i is None else i.to_list() for n, i in kept.per_benchmark.items()}}
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


def evaluate_cell(model: nn.Module, processor, benches: Sequence[Any], config: Any, reference: Any,
                  progress: bool) -> EvalReport:
    """The benchmarks on ``model`` as every grid scores a cell: ``config``'s batch_size, max_new_tokens and seed,
    per-item scores kept."""
    return evaluate_all(model, processor, benches, reference=reference, batch_size=config.batch_size,
                        max_new_tokens=config.max_new_tokens, progress=progress, seed=config.seed, return_items=True)


def dense_reference(model: nn.Module, processor, benches: Sequence[Any], progress: bool) -> FidelityReference | None:
    """The dense ``model``'s fidelity reference over the fidelity benchmarks among ``benches`` (None: none)."""
    fidelity = [b for b in benches if getattr(b, "kind", None) == "fidelity"]
    return fidelity_reference(model, processor, fidelity, progress=progress) if fidelity else None


def load_reference(results: ResultLog, benches: Sequence[Any],
                   compute: Callable[[], FidelityReference | None]) -> FidelityReference | None:
    """The dense model's fidelity reference (``compute()``, e.g. :func:`dense_reference`), computed once and
    kept in the study folder with the fingerprint of the study's setup it was computed under (the setup is
    pinned before it is written; shards running at once each write a whole file). A stored reference of
    another setup (another model or benchmarks, a file placed by hand) is refused."""
    if not any(getattr(b, "kind", None) == "fidelity" for b in benches):
        return None
    path = results.out_dir / REFERENCE
    if path.is_file():
        try:
            stored = FidelityReference.load(path)
        except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
            raise ToolkitError(f"{path} is corrupt ({type(err).__name__}); delete it to recompute the dense "
                               "reference, or choose another --out") from None
        differs = prints_differ(stored.source, results.prints)
        if differs is None or differs:
            why = ("it records no setup it was computed from" if differs is None else
                   f"its setup differs in {', '.join(differs)}")
            raise ToolkitError(f"{path} is not this study's dense reference ({why}); delete it to recompute it, or "
                               "choose another --out")
        return stored
    reference = compute()
    reference.source = results.prints
    results.pin()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        reference.save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return reference


# -- what a worker loads --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellInputs:
    """What a grid's cells read, by path, so that another process (a Ray task) loads it on its own: the model
    (a folder or a Hub id, with its load options), the calibration records and the benchmark files. Paths
    are made absolute: on a cluster they must name the same files on every node (a shared file system)."""

    model: str
    calib: str
    images: str
    benchmarks: tuple[str, ...]
    nsamples: int
    seed: int = 0
    max_length: int | None = None
    calib_batch_size: int = 1
    allow_outside: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)

    def __post_init__(self) -> None:
        def absolute(path: Any) -> str:
            return str(Path(path).resolve()) if Path(path).exists() else str(path)  # a Hub id stays as given

        for name in ("model", "calib", "images"):
            object.__setattr__(self, name, absolute(getattr(self, name)))
        object.__setattr__(self, "benchmarks", tuple(absolute(b) for b in self.benchmarks))

    def open_benchmarks(self) -> list[Benchmark]:
        return [load_benchmark(path, self.allow_outside) for path in self.benchmarks]

    def open(self, with_calibration: bool = True) -> tuple[nn.Module, Any, list[dict[str, Any]], list[Benchmark]]:
        """(model, processor, calibration batches, benchmarks), loaded as ``atv probe`` loads them: seeded first."""
        model, processor, calibration, _ = self._load(with_calibration)
        return model, processor, calibration, self.open_benchmarks()

    def facts(self) -> tuple[str, list[str], int]:
        """What a study pins of the loaded inputs: the model's dtype, the calibration sample ids, the number of
        calibration batches."""
        from pruning.io import dtype_name

        model, _, calibration, report = self._load(True)
        return dtype_name(model), report.ids, len(calibration)

    def reference(self) -> FidelityReference | None:
        """The dense fidelity reference, from a model loaded here (a task's way to :func:`dense_reference`)."""
        model, processor, _, benches = self.open(with_calibration=False)
        return dense_reference(model, processor, benches, progress=False)

    def _load(self, with_calibration: bool):
        from transformers import set_seed

        from pruning.data import load_llava_conversations
        from pruning.io import load_model

        set_seed(self.seed)
        model, processor = load_model(self.model, self.load)
        if not with_calibration:
            return model, processor, [], None
        calibration, report = load_llava_conversations(self.calib, self.images, processor, self.nsamples, self.seed,
                                                       self.max_length, batch_size=self.calib_batch_size,
                                                       allow_outside=self.allow_outside)
        return model, processor, calibration, report
