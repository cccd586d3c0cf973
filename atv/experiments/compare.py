"""Compare pruning methods on the real, shared weights: prune a fresh dense model per cell
(method x setting), evaluate, and log one record per cell (resumable, like the probe study).

A setting is a sparsity (``"50%"``) or an N:M pattern (``"2:4"``). A method is a name of
:data:`pruning.config.METHOD_CONFIGS`, optionally with a non-uniform allocation at the same global budget:
``"atv+owl"``, or ``"atv+map"`` with ``CompareConfig.allocation_map``. Records::

    {"cell": {"method": "atv", "setting": "2:4"}, "scores": {...}, "retention": {...},
     "mean_retention": 97.1, "prune": {"mean_sparsity": 0.5, "seconds": 12.3, ...}}

with the dense baseline as ``{"method": "dense", "setting": "dense"}``.

:func:`compare_cells` (``atv compare``) sets two cells of any result log (probe or method grid) side by side:
their paired difference per benchmark and in mean retention, with bootstrap intervals over the same items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from analysis.records import check_numbers
from analysis.tables import difference_table, record_interval, scores_table, write_table
from evaluation import Benchmark
from evaluation.intervals import DEFAULT_BOOTSTRAP, DEFAULT_LEVEL, DEFAULT_RESAMPLES, Bootstrap, paired_differences
from pruning.allocation import ALLOCATIONS
from pruning.config import METHOD_CONFIGS, PruneConfig, parse_pattern
from pruning.engine import PruneReport, prune_
from pruning.errors import ConfigError, ToolkitError
from pruning.options import check_seed, option

from .cells import (
    CellInputs,
    dense_reference,
    evaluate_cell,
    load_reference,
    measure_cell,
    open_benchmarks,
    open_log,
    paired_items,
    record_items,
    run_cells,
)
from .executors import InProcess, RayExecutor
from .records import RESULTS, ResultLog, read_records, study_lock

log = logging.getLogger(__name__)

DENSE = {"method": "dense", "setting": "dense"}


def split_method(method: str) -> tuple[str, str]:
    """'atv+owl' -> ('atv', 'owl'); 'wanda' -> ('wanda', 'uniform'). Either part must be known."""
    name, _, allocation = method.partition("+")
    allocation = allocation or "uniform"
    if name not in METHOD_CONFIGS or allocation not in ALLOCATIONS or method.endswith("+"):
        raise ConfigError(f"unknown method {method!r}; choose from {sorted(METHOD_CONFIGS)}, optionally with '+' "
                          f"and an allocation of {[a for a in ALLOCATIONS if a != 'uniform']} (e.g. 'atv+owl')")
    return name, allocation


def setting_config(method: str, setting: str, seed: int = 0, allocation_map: str | Path | None = None) -> PruneConfig:
    """'50%' -> sparsity 0.5; '2:4' -> the N:M pattern; a method 'atv+owl' -> ATV with the owl allocation
    ('+map' reads ``allocation_map``)."""
    name, allocation = split_method(method)
    chosen = {"allocation": allocation, "allocation_map": allocation_map if allocation == "map" else None}
    if ":" in setting:
        return PruneConfig(name, pattern=setting, seed=seed, **chosen)
    try:
        value = float(setting.rstrip("%")) / (100 if setting.endswith("%") else 1)
    except ValueError:
        raise ConfigError(f"setting must be a sparsity like '50%' / '0.5' or a pattern like '2:4', "
                          f"got {setting!r}") from None
    return PruneConfig(name, sparsity=value, seed=seed, **chosen)


@dataclass
class CompareConfig:
    methods: tuple[str, ...] = ("atv", "wanda", "sparsegpt", "magnitude")
    settings: tuple[str, ...] = ("50%", "60%", "2:4")
    seed: int = 0
    batch_size: int = 8                               # evaluation batch
    max_new_tokens: int = 8
    allocation_map: str | None = None                 # sensitivity map of the '+map' methods (atv probe --map)

    def __post_init__(self) -> None:
        self.methods, self.settings = tuple(self.methods), tuple(self.settings)
        check_seed(self.seed)
        if not self.methods:
            raise ConfigError(f"methods is empty; choose from {sorted(METHOD_CONFIGS)}")
        for method in self.methods:
            split_method(method)
        if self.allocation_map is not None:
            self.allocation_map = str(self.allocation_map)
        if not self.settings:
            raise ConfigError("settings is empty; e.g. '50%' or '2:4'")
        for setting in self.settings:
            for method in self.methods:
                setting_config(method, setting, allocation_map=self.allocation_map)  # validates, names the bad one
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


def run_method_comparison(make_model: Callable[[], nn.Module], processor, calibration: Sequence[Mapping[str, Any]],
                          benchmarks: Iterable[Benchmark | str | Path], out_dir: str | Path,
                          config: CompareConfig | None = None, *, setup_extra: Mapping[str, Any] | None = None,
                          progress: bool = True, dense_record: Mapping[str, Any] | None = None) -> CompareResult:
    """Run (or resume) the method x setting grid in this process; ``make_model()`` returns a fresh dense model
    each call.

    ``dense_record``: the dense model's record from another study on the same benchmarks (e.g. the probe
    study's dense cell), reused instead of evaluating the dense model again."""
    config = config or CompareConfig()
    benches = open_benchmarks(benchmarks)
    with study_lock(out_dir):
        results = open_log(out_dir, config, benches, len(calibration), setup_extra)
        _reuse_dense(results, config, benches, dense_record)
        fresh: list[nn.Module] = []  # the model the reference was computed on is the first cell's

        def reference():
            fresh.append(make_model())
            return dense_reference(fresh[0], processor, benches, progress)

        shared = load_reference(results, benches, reference)

        def measure(cell: dict[str, str], reference) -> dict[str, Any]:
            model = fresh.pop() if fresh else make_model()
            return _measure(model, processor, calibration, benches, config, cell, reference, progress)

        computed = run_cells(results, config.cells(), measure, shared, desc="method cells", progress=progress)
        return _result(results, config, computed)


@dataclass(frozen=True)
class CompareCells:
    """The comparison's cells as a task that runs in any process (a Ray worker): it loads a fresh dense
    model, the calibration and the benchmarks from ``inputs``, prunes and measures one cell. Picklable."""

    inputs: CellInputs
    config: CompareConfig

    def __call__(self, cell: dict[str, str], reference) -> dict[str, Any]:
        model, processor, calibration, benches = self.inputs.open()
        return _measure(model, processor, calibration, benches, self.config, cell, reference, progress=False)

    def reference(self):
        return self.inputs.reference()


def run_compare_cells(task: CompareCells, out_dir: str | Path, executor: InProcess | RayExecutor, *,
                      calibration_batches: int, setup_extra: Mapping[str, Any] | None = None, progress: bool = True,
                      dense_record: Mapping[str, Any] | None = None) -> CompareResult:
    """Run (or resume) the grid with ``executor`` computing each missing cell with ``task`` (each loads its own
    model); this process alone writes the records. Same setup as :func:`run_method_comparison`'s."""
    benches = task.inputs.open_benchmarks()
    with study_lock(out_dir):
        results = open_log(out_dir, task.config, benches, calibration_batches, setup_extra)
        _reuse_dense(results, task.config, benches, dense_record)
        reference = load_reference(results, benches, lambda: executor.call(task.reference))
        computed = run_cells(results, task.config.cells(), task, reference, desc="method cells", progress=progress,
                             executor=executor)
        return _result(results, task.config, computed)


def _reuse_dense(results: ResultLog, config: CompareConfig, benches, dense_record: Mapping[str, Any] | None) -> None:
    if dense_record is not None and not results.done(config.cells()[0]):
        if sorted(dense_record["scores"]) != sorted(b.name for b in benches):
            raise ConfigError(f"dense_record scores {sorted(dense_record['scores'])} are not these benchmarks "
                              f"{[b.name for b in benches]}")
        results.append({**dense_record, "cell": dict(DENSE), "prune": None})


def _result(results: ResultLog, config: CompareConfig, computed: int) -> CompareResult:
    records = results.ordered(config.cells())
    out = CompareResult(results.out_dir, records, computed=computed)
    out.tables = write_table(scores_table(records, _label), "method_scores", results.out_dir)
    return out


def _measure(model: nn.Module, processor, calibration, benches, config: CompareConfig, cell: Mapping[str, str],
             reference, progress: bool) -> dict[str, Any]:
    return measure_cell(cell, lambda: _prune(model, calibration, config, cell),
                        lambda: evaluate_cell(model, processor, benches, config, reference, progress),
                        model, Bootstrap(seed=config.seed))


def _label(record: Mapping[str, Any]) -> str:
    return f"{record['cell']['method']} {record['cell']['setting']}"


def _prune(model: nn.Module, calibration, config: CompareConfig, cell: Mapping[str, str]) -> PruneReport | None:
    """Prune the fresh model's shared weights as the cell says (nothing for the dense cell)."""
    if cell["method"] == "dense":
        return None
    prune_config = setting_config(cell["method"], cell["setting"], config.seed, config.allocation_map)
    return prune_(model, prune_config, calibration if prune_config.needs_calibration else (), progress=False)


# -- two cells of a result log, paired on their items ---------------------------------------------------
MEAN_ROW = "mean retention"


def cell_label(record: Mapping[str, Any]) -> str:
    """A cell's values joined by '/': 'text/visual/0.6' (probe), 'atv/50%' (methods), 'dense'."""
    values = [str(v) for v in record["cell"].values()]
    return "dense" if "dense" in values else "/".join(values)


def _same(given: str, value: str) -> bool:
    try:
        return given == value or float(given) == float(value)  # '0.60' names the sparsity 0.6
    except ValueError:
        return False


def find_cell(records: Sequence[Mapping[str, Any]], spec: str) -> Mapping[str, Any]:
    """The record whose :func:`cell_label` reads ``spec`` (numbers match by value)."""
    given = spec.strip().split("/")
    for record in records:
        label = cell_label(record).split("/")
        if len(label) == len(given) and all(_same(g, v) for g, v in zip(given, label)):
            return record
    labels = ", ".join(cell_label(r) for r in records)
    raise ConfigError(f"no cell {spec!r} in these records; choose one of: {labels}")


def compare_cells(records: Sequence[Mapping[str, Any]], a: str, b: str,
                  boot: Bootstrap = DEFAULT_BOOTSTRAP) -> dict[str, Any]:
    """Cell ``a`` minus cell ``b`` (specs as :func:`find_cell` reads them), resampling the same items of both
    and of the log's dense record: per benchmark in score points (%), and in mean retention when both cells
    and the dense record hold the items of every benchmark their retention averages.

    Returns ``{"a", "b", "rows": {name: {"a", "a_ci", "b", "b_ci", "diff", "diff_ci"}}, "bootstrap": {...},
    "left_out": {name: why}}`` (:func:`analysis.tables.difference_table` writes it); each benchmark (or the mean
    retention) left out is also logged as a warning with its reason. A cell (or the dense record) whose values
    are not finite numbers is refused by :func:`analysis.records.check_numbers`."""
    first, second = find_cell(records, a), find_cell(records, b)
    dense = next((r for r in records if cell_label(r) == "dense"), None)
    for record in (first, second, dense):
        if record is not None:
            check_numbers(record, f"cell {cell_label(record)!r}")
    shared = paired_items(first, second)
    if not shared:
        raise ToolkitError(f"cells {a!r} and {b!r} hold no per-item scores of the same items (records written "
                           "before per-item scores were kept): re-run those cells in a new --out to compare them")
    retained = [n for n in paired_items(first, dense) if n in first["retention"]] if dense is not None else []
    items_a, items_b = record_items(first), record_items(second)
    dense_items = {n: record_items(dense)[n] for n in retained if n in shared}
    differences = paired_differences({n: items_a[n] for n in shared}, {n: items_b[n] for n in shared},
                                     dense_items, boot)
    rows = {name: _row(first["scores"][name], record_interval(first, "scores", name), second["scores"][name],
                       record_interval(second, "scores", name), est) for name, est in differences.scores.items()}
    if differences.mean_retention is not None and set(dense_items) == set(first["retention"]) == \
            set(second["retention"]):
        rows[MEAN_ROW] = _row(first["mean_retention"], record_interval(first, "mean_retention"),
                              second["mean_retention"], record_interval(second, "mean_retention"),
                              differences.mean_retention)
    left_out = {name: _why_unpaired(first, second, name) for name in dict.fromkeys([*first["scores"],
                                                                                    *second["scores"]])
                if name not in rows}
    if MEAN_ROW not in rows:
        left_out[MEAN_ROW] = "the log holds no dense record" if dense is None else \
            "the dense record and both cells do not hold the same items of every benchmark their retention averages"
    for name, why in left_out.items():
        log.warning("compare %s vs %s: %s left out: %s", cell_label(first), cell_label(second), name, why)
    return {"a": cell_label(first), "b": cell_label(second), "rows": rows, "bootstrap": boot.to_dict(),
            "left_out": left_out}


def _why_unpaired(first: Mapping[str, Any], second: Mapping[str, Any], name: str) -> str:
    """Why benchmark ``name`` of either cell has no paired row."""
    for record in (first, second):
        if name not in record["scores"]:
            return f"only cell {cell_label(second if record is first else first)!r} scored it"
        if name not in (record.get("items") or {}):
            return f"cell {cell_label(record)!r} holds no per-item scores of it"
    if first["items"][name]["ids"] != second["items"][name]["ids"]:
        return "the two cells scored different items"
    return "the two cells hold different numbers of item scores"


def _row(a: float, a_ci, b: float, b_ci, difference) -> dict[str, Any]:
    interval = None if difference.interval is None else difference.interval.to_list()
    return {"a": a, "a_ci": a_ci, "b": b, "b_ci": b_ci, "diff": difference.value, "diff_ci": interval}


@dataclass
class CompareCellsJob:
    """``atv compare``: two cells of a result log, compared on the same items.

    Args:
        results: a study folder (its ``results.jsonl``) or a results ``.jsonl`` file.
        a: cell A, its values joined by ``/``, e.g. ``text/text/0.6`` (probe) or ``atv/50%`` (methods).
        b: cell B, the same way; the table gives A - B.
        level: confidence level of the intervals.
        resamples: bootstrap resamples.
        seed: seed of the bootstrap.
    """
    results: Path = option(help="a study folder (its results.jsonl) or a results .jsonl file")
    a: str = option(help="cell A: its values joined by '/', e.g. text/text/0.6 (probe) or atv/50% (methods)")
    b: str = option(help="cell B, the same way; the table gives A - B")
    level: float = option(DEFAULT_LEVEL, "confidence level of the intervals")
    resamples: int = option(DEFAULT_RESAMPLES, "bootstrap resamples")
    seed: int = option(0, "seed of the bootstrap")

    def __post_init__(self) -> None:
        self.results = Path(self.results)
        check_seed(self.seed)
        self.bootstrap()  # refuses a bad level, resamples or seed now

    def bootstrap(self) -> Bootstrap:
        try:
            return Bootstrap(level=self.level, resamples=self.resamples, seed=self.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def run_compare_job(job: CompareCellsJob) -> tuple[dict[str, Any], tuple[list[str], list[list[str]]]]:
    """``atv compare``: read the log and compare the two cells, paired on their items.

    Args:
        job: the job.

    Returns:
        The difference (A, B and A - B with their intervals) and its table ``(header, rows)``.

    Raises:
        ToolkitError: a cell that is not in the log, or records without per-item scores (re-run them).
    """
    boot = job.bootstrap()
    path = job.results / RESULTS if job.results.is_dir() else job.results
    if not path.is_file():
        raise ConfigError(f"no result log at {path}; pass a study folder (with {RESULTS}) or a results .jsonl file")
    difference = compare_cells(read_records(path), job.a, job.b, boot)
    return difference, difference_table(difference)
