"""Sensitivity curves of the MoT probe and the comparison of pruning methods, from result records.

Probe records (``atv probe``, one per cell; see :mod:`atv.experiments.probe_study`)::

    {"cell": {"pathway": "text", "pool": "visual", "sparsity": 0.5}, "mean_retention": 94.3,
     "retention": {bench: %}, "scores": {bench: %}}          # dense: {"cell": {"pathway": "dense"}, ...}

Method records (one per method x setting; dense: ``{"method": "dense", "setting": "dense"}``)::

    {"cell": {"method": "atv", "setting": "50%"}, "scores": {bench: %}, "retention": {bench: %},
     "mean_retention": 97.1}

Both live in JSONL files (``DIR/probe/results.jsonl``, ``DIR/methods/results.jsonl``), written by the
studies of :mod:`atv.experiments` (:func:`write_records` writes records built elsewhere). A record's
``"intervals"`` (95% bootstrap intervals over items) become error bars; records without them are drawn
without.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pruning.errors import ConfigError

from .style import DENSE_COLOR, PATHWAY_LINESTYLES, POOL_COLORS, color_for, new_figure, style_context, wrap_label
from .tables import record_interval

log = logging.getLogger(__name__)

VALUES = ("retention", "scores")


# -- records I/O ---------------------------------------------------------------------------------
def write_records(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write records as JSONL (one JSON object per line), replacing the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in records), encoding="utf-8")
    return path


# -- probe sensitivity ---------------------------------------------------------------------------
@dataclass
class SensitivityCurves:
    """Mean retention (% of dense) vs sparsity (%) per (pathway, pool)."""

    curves: dict[tuple[str, str], list[tuple[float, float]]]  # (pathway, pool) -> [(sparsity %, retention %)]
    dense: float = 100.0                                      # the dense model's retention, by definition
    intervals: dict[tuple[str, str], list[tuple[float, float] | None]] = field(default_factory=dict)  # per point


def _cell(record: Mapping[str, Any], index: int, keys: Sequence[str]) -> Mapping[str, Any]:
    cell = record.get("cell") if isinstance(record, Mapping) else None
    if not isinstance(cell, Mapping) or any(k not in cell for k in keys):
        raise ConfigError(f"record {index} has no cell with {list(keys)}: {str(record)[:120]}")
    return cell


def sensitivity_curves(records: Iterable[Mapping[str, Any]]) -> SensitivityCurves:
    """Probe records -> curves; raises ConfigError when there is no pruned cell or a record is malformed."""
    records = list(records)
    points: dict[tuple[str, str], list[tuple[float, float, tuple[float, float] | None]]] = {}
    for index, record in enumerate(records):
        if _cell(record, index, ("pathway",))["pathway"] == "dense":
            continue
        cell = _cell(record, index, ("pathway", "pool", "sparsity"))
        if "mean_retention" not in record:
            raise ConfigError(f"probe record {index} ({dict(cell)}) has no mean_retention")
        key = (str(cell["pathway"]), str(cell["pool"]))
        interval = record_interval(record, "mean_retention")
        points.setdefault(key, []).append((100.0 * float(cell["sparsity"]), float(record["mean_retention"]),
                                           None if interval is None else (float(interval[0]), float(interval[1]))))
    if not points:
        raise ConfigError(f"no pruned probe cell among {len(records)} records: nothing to plot")
    ordered = {k: sorted(v, key=lambda p: p[:2]) for k, v in points.items()}
    return SensitivityCurves({k: [(x, y) for x, y, _ in v] for k, v in ordered.items()},
                             intervals={k: [i for _, _, i in v] for k, v in ordered.items()})


def error_bars(values: Sequence[float], intervals: Sequence[Sequence[float] | None]) -> np.ndarray | None:
    """matplotlib's ``yerr`` (2, n): distances from each value down and up to its interval's bounds (0 where
    a bound lies on the other side, NaN where there is no interval); None when no value has one."""
    if all(i is None for i in intervals):
        return None
    bars = np.full((2, len(values)), np.nan)
    for k, (value, interval) in enumerate(zip(values, intervals)):
        if interval is not None:
            bars[:, k] = (max(0.0, value - interval[0]), max(0.0, interval[1] - value))
    return bars


def sensitivity_figure(records: Iterable[Mapping[str, Any]]):
    """-> (SensitivityCurves, Figure): retention vs sparsity, colour = pool, line style = pathway."""
    data = sensitivity_curves(records)
    xs = sorted({x for points in data.curves.values() for x, _ in points})
    dodge = 0.1 * min(np.diff(xs), default=10.0) / max(1, len(data.curves) - 1)  # sparsity points between curves
    with style_context():
        fig = new_figure(6.0, 4.0)
        ax = fig.add_subplot()
        ax.axhline(data.dense, color=DENSE_COLOR, linestyle=":", linewidth=1.2, label="dense (100%)")
        for k, ((pathway, pool), points) in enumerate(data.curves.items()):  # records' order: text path first
            x, y = zip(*points)
            color = POOL_COLORS.get(pool, color_for(k))
            yerr = error_bars(y, data.intervals.get((pathway, pool), [None] * len(y)))
            if yerr is not None:  # 95% bootstrap intervals over items: curves dodged so their bars stay apart
                x = np.asarray(x) + dodge * (k - (len(data.curves) - 1) / 2)
                ax.errorbar(x, y, yerr=yerr, fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5, alpha=0.8)
            hollow = pathway != "text"  # visual-path curves sit on top of each other near 100: tell them apart
            ax.plot(x, y, marker="s" if hollow else "o", markersize=5, color=color,
                    markerfacecolor="white" if hollow else color, linestyle=PATHWAY_LINESTYLES.get(pathway, "-."),
                    label=f"{pathway} path, {pool} pool")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        pad = max(2.0, 0.05 * (xs[-1] - xs[0]))
        ax.set_xlim(xs[0] - pad, xs[-1] + pad)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("mean retention (% of dense)")
        ax.set_title("MoT probe: retention when one pathway is pruned" +
                     (" (95% CI)" if any(i for v in data.intervals.values() for i in v) else ""))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="pruned pathway, calibration")
    return data, fig


# -- method comparison ---------------------------------------------------------------------------
@dataclass
class MethodComparison:
    """values[setting][method][benchmark] (retention % or score %), 'mean' included as a benchmark."""

    value: str
    settings: list[str]
    methods: list[str]
    benchmarks: list[str]
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    dense: dict[str, float] = field(default_factory=dict)   # the dense model's values (scores or 100)
    intervals: dict[str, dict[str, dict[str, tuple[float, float]]]] = field(default_factory=dict)  # like values
    dense_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)                # scores only


def method_comparison(records: Iterable[Mapping[str, Any]], value: str = "retention") -> MethodComparison:
    """Method records -> per setting, method and benchmark values (+ a 'mean' column)."""
    if value not in VALUES:
        raise ConfigError(f"value must be one of {VALUES}, got {value!r}")
    records = list(records)
    settings: list[str] = []
    methods: list[str] = []
    benchmarks: list[str] = []
    values: dict[str, dict[str, dict[str, float]]] = {}
    intervals: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    dense: dict[str, float] = {}
    dense_intervals: dict[str, tuple[float, float]] = {}
    for index, record in enumerate(records):
        cell = _cell(record, index, ("method", "setting"))
        per = record.get(value)
        if not isinstance(per, Mapping) or not per:
            if cell["method"] == "dense" and value == "retention":
                continue  # a dense record may carry scores only; its retention is 100 by definition
            raise ConfigError(f"method record {index} ({dict(cell)}) has no {value!r} per benchmark")
        per = {str(b): float(v) for b, v in per.items()}
        benchmarks += [b for b in per if b not in benchmarks]
        mean = float(record["mean_retention"]) if value == "retention" and "mean_retention" in record \
            else float(np.mean(list(per.values())))
        bounds = _value_intervals(record, value, per)
        if cell["method"] == "dense":
            dense, dense_intervals = {**per, "mean": mean}, bounds
            continue
        method, setting = str(cell["method"]), str(cell["setting"])
        methods += [method] if method not in methods else []
        settings += [setting] if setting not in settings else []
        values.setdefault(setting, {})[method] = {**per, "mean": mean}
        intervals.setdefault(setting, {})[method] = bounds
    if not values:
        raise ConfigError(f"no pruned method record among {len(records)} records: nothing to compare")
    if value == "retention":
        dense, dense_intervals = {b: 100.0 for b in benchmarks + ["mean"]}, {}
    return MethodComparison(value, settings, methods, benchmarks + ["mean"], values, dense, intervals,
                            dense_intervals)


def _value_intervals(record: Mapping[str, Any], value: str, per: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """The record's intervals of ``value`` per benchmark, and of the mean retention as 'mean' (scores: the
    mean of the benchmarks' scores has none)."""
    found = {b: record_interval(record, value, b) for b in per}
    if value == "retention":
        found["mean"] = record_interval(record, "mean_retention")
    return {b: (float(i[0]), float(i[1])) for b, i in found.items() if i is not None}


def method_figure(records: Iterable[Mapping[str, Any]], value: str = "retention"):
    """-> (MethodComparison, Figure): one panel per setting, grouped bars per benchmark, one bar per method."""
    data = method_comparison(records, value)
    n_bench, n_methods = len(data.benchmarks), len(data.methods)
    width = 0.8 / n_methods
    ylabel = "retention (% of dense)" if value == "retention" else "score (%)"
    with style_context():
        fig = new_figure(min(16.0, max(6.0, 1.5 + 0.14 * n_bench * (n_methods + 1))), 2.4 * len(data.settings) + 0.9)
        axes = fig.subplots(len(data.settings), 1, squeeze=False, sharex=True)[:, 0]
        x = np.arange(n_bench)
        for ax, setting in zip(axes, data.settings):
            for k, method in enumerate(data.methods):
                row = data.values[setting].get(method, {})
                heights = [row.get(b, np.nan) for b in data.benchmarks]
                bounds = data.intervals.get(setting, {}).get(method, {})
                yerr = error_bars(heights, [bounds.get(b) for b in data.benchmarks])
                ax.bar(x + (k - (n_methods - 1) / 2) * width, heights, width, color=color_for(k), label=method,
                       yerr=yerr, error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#333333"})
            if data.dense:
                if value == "retention":
                    ax.axhline(100.0, color=DENSE_COLOR, linestyle=":", linewidth=1.2, label="dense")
                else:
                    heights = [data.dense.get(b, np.nan) for b in data.benchmarks]
                    ax.scatter(x, heights, marker="_", s=300, color=DENSE_COLOR, zorder=3, label="dense")
                    yerr = error_bars(heights, [data.dense_intervals.get(b) for b in data.benchmarks])
                    if yerr is not None:
                        ax.errorbar(x, heights, yerr=yerr, fmt="none", ecolor=DENSE_COLOR, elinewidth=0.8,
                                    capsize=0, zorder=3)
            ax.axvline(n_bench - 1.5, color="#bbbbbb", linewidth=0.8)  # separates the mean from the benchmarks
            if value == "retention":
                # retention sits near 100: start the axis below the lowest bar (not at 0) so the gaps show
                low = min([v for row in data.values[setting].values() for v in row.values()]
                          + [i[0] for row in data.intervals.get(setting, {}).values() for i in row.values()])
                ax.set_ylim(max(0.0, 10 * np.floor((low - 5) / 10)), max(105.0, ax.get_ylim()[1]))
            ax.set_ylabel(ylabel)
            ax.set_title(f"setting: {setting}")
            ax.grid(axis="x", visible=False)
        axes[-1].set_xticks(x, [wrap_label(b) for b in data.benchmarks], rotation=30, ha="right",
                            rotation_mode="anchor")  # ten or more names side by side would overlap
        axes[-1].set_xlabel("benchmark")
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
        bars = " with 95% CI" if any(b for per in data.intervals.values() for b in per.values()) else ""
        fig.suptitle(f"Pruning methods compared ({'retention' if value == 'retention' else 'scores'}{bars})")
    return data, fig
