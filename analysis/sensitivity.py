"""Sensitivity curves of the MoT probe and the comparison of pruning methods, from result records.

Probe records (``atv probe``, one per cell; see :mod:`atv.experiments.probe_study`)::

    {"cell": {"pathway": "text", "pool": "visual", "sparsity": 0.5}, "mean_retention": 94.3,
     "retention": {bench: %}, "scores": {bench: %}}          # dense: {"cell": {"pathway": "dense"}, ...}

Method records (one per method x setting; dense: ``{"method": "dense", "setting": "dense"}``)::

    {"cell": {"method": "atv", "setting": "50%"}, "scores": {bench: %}, "retention": {bench: %},
     "mean_retention": 97.1}

Both live in JSONL files (``DIR/probe/results.jsonl``, ``DIR/methods/results.jsonl``), written by the
studies of :mod:`atv.experiments` (:func:`write_records` writes records built elsewhere).
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


def _cell(record: Mapping[str, Any], index: int, keys: Sequence[str]) -> Mapping[str, Any]:
    cell = record.get("cell") if isinstance(record, Mapping) else None
    if not isinstance(cell, Mapping) or any(k not in cell for k in keys):
        raise ConfigError(f"record {index} has no cell with {list(keys)}: {str(record)[:120]}")
    return cell


def sensitivity_curves(records: Iterable[Mapping[str, Any]]) -> SensitivityCurves:
    """Probe records -> curves; raises ConfigError when there is no pruned cell or a record is malformed."""
    records = list(records)
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for index, record in enumerate(records):
        if _cell(record, index, ("pathway",))["pathway"] == "dense":
            continue
        cell = _cell(record, index, ("pathway", "pool", "sparsity"))
        if "mean_retention" not in record:
            raise ConfigError(f"probe record {index} ({dict(cell)}) has no mean_retention")
        key = (str(cell["pathway"]), str(cell["pool"]))
        curves.setdefault(key, []).append((100.0 * float(cell["sparsity"]), float(record["mean_retention"])))
    if not curves:
        raise ConfigError(f"no pruned probe cell among {len(records)} records: nothing to plot")
    return SensitivityCurves({k: sorted(v) for k, v in curves.items()})


def sensitivity_figure(records: Iterable[Mapping[str, Any]]):
    """-> (SensitivityCurves, Figure): retention vs sparsity, colour = pool, line style = pathway."""
    data = sensitivity_curves(records)
    xs = sorted({x for points in data.curves.values() for x, _ in points})
    with style_context():
        fig = new_figure(6.0, 4.0)
        ax = fig.add_subplot()
        ax.axhline(data.dense, color=DENSE_COLOR, linestyle=":", linewidth=1.2, label="dense (100%)")
        for k, ((pathway, pool), points) in enumerate(data.curves.items()):  # records' order: text path first
            x, y = zip(*points)
            color = POOL_COLORS.get(pool, color_for(k))
            hollow = pathway != "text"  # visual-path curves sit on top of each other near 100: tell them apart
            ax.plot(x, y, marker="s" if hollow else "o", markersize=5, color=color,
                    markerfacecolor="white" if hollow else color, linestyle=PATHWAY_LINESTYLES.get(pathway, "-."),
                    label=f"{pathway} path, {pool} pool")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        pad = max(2.0, 0.05 * (xs[-1] - xs[0]))
        ax.set_xlim(xs[0] - pad, xs[-1] + pad)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("mean retention (% of dense)")
        ax.set_title("MoT probe: retention when one pathway is pruned")
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


def method_comparison(records: Iterable[Mapping[str, Any]], value: str = "retention") -> MethodComparison:
    """Method records -> per setting, method and benchmark values (+ a 'mean' column)."""
    if value not in VALUES:
        raise ConfigError(f"value must be one of {VALUES}, got {value!r}")
    records = list(records)
    settings: list[str] = []
    methods: list[str] = []
    benchmarks: list[str] = []
    values: dict[str, dict[str, dict[str, float]]] = {}
    dense: dict[str, float] = {}
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
        if cell["method"] == "dense":
            dense = {**per, "mean": mean}
            continue
        method, setting = str(cell["method"]), str(cell["setting"])
        methods += [method] if method not in methods else []
        settings += [setting] if setting not in settings else []
        values.setdefault(setting, {})[method] = {**per, "mean": mean}
    if not values:
        raise ConfigError(f"no pruned method record among {len(records)} records: nothing to compare")
    if value == "retention":
        dense = {b: 100.0 for b in benchmarks + ["mean"]}
    return MethodComparison(value, settings, methods, benchmarks + ["mean"], values, dense)


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
                ax.bar(x + (k - (n_methods - 1) / 2) * width, heights, width, color=color_for(k), label=method)
            if data.dense:
                if value == "retention":
                    ax.axhline(100.0, color=DENSE_COLOR, linestyle=":", linewidth=1.2, label="dense")
                else:
                    ax.scatter(x, [data.dense.get(b, np.nan) for b in data.benchmarks], marker="_", s=300,
                               color=DENSE_COLOR, zorder=3, label="dense")
            ax.axvline(n_bench - 1.5, color="#bbbbbb", linewidth=0.8)  # separates the mean from the benchmarks
            if value == "retention":
                # retention sits near 100: start the axis below the lowest bar (not at 0) so the gaps show
                low = min(v for row in data.values[setting].values() for v in row.values())
                ax.set_ylim(max(0.0, 10 * np.floor((low - 5) / 10)), max(105.0, ax.get_ylim()[1]))
            ax.set_ylabel(ylabel)
            ax.set_title(f"setting: {setting}")
            ax.grid(axis="x", visible=False)
        axes[-1].set_xticks(x, [wrap_label(b) for b in data.benchmarks], rotation=30, ha="right",
                            rotation_mode="anchor")  # ten or more names side by side would overlap
        axes[-1].set_xlabel("benchmark")
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
        fig.suptitle(f"Pruning methods compared ({'retention' if value == 'retention' else 'scores'})")
    return data, fig
