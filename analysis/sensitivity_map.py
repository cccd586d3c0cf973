"""The layer-by-layer sensitivity map (``atv probe --map``): tables and the heat map, from its records.

A map record (one per cell; see :mod:`atv.experiments.sensitivity_map`)::

    {"cell": {"layer": 3, "pathway": "text", "group": "ffn", "sparsity": 0.7},
     "kl": 0.031, "top1": 91.2, "kl_items": [...], "top1_items": [...], ...}

The dense cell (``{"pathway": "dense"}``, KL 0 and top-1 100 by construction) is left out of the tables.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from pruning.errors import ToolkitError

from .tables import Table

PATHWAYS, GROUPS = ("text", "visual"), ("attn", "ffn")
COLUMNS = tuple(f"{p}-{g}" for p in PATHWAYS for g in GROUPS)  # text-attn, text-ffn, visual-attn, visual-ffn
METRICS = {"kl": "mean KL(dense || pruned), nats", "top1": "top-1 agreement with dense (%)"}


def map_values(records: Iterable[Mapping[str, Any]], metric: str = "kl") -> tuple[list[int], np.ndarray]:
    """(layers, values (L, 4) in :data:`COLUMNS` order; NaN where a cell is missing) of the map's records."""
    if metric not in METRICS:
        raise ToolkitError(f"unknown map metric {metric!r}; choose one of {list(METRICS)}")
    cells = [r for r in records if "layer" in r.get("cell", {})]
    if not cells:
        raise ToolkitError("no map cell among the records (only a dense record?)")
    layers = sorted({int(r["cell"]["layer"]) for r in cells})
    values = np.full((len(layers), len(COLUMNS)), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    for r in cells:
        column = f"{r['cell']['pathway']}-{r['cell']['group']}"
        if column in COLUMNS:
            values[row[int(r["cell"]["layer"])], COLUMNS.index(column)] = float(r[metric])
    return layers, values


def _fmt(value: float, metric: str, interval: list[float] | None = None) -> str:
    """'0.0312' (KL) or '91.20' (top-1), with ' [low, high]' when the record has the interval."""
    if math.isnan(value):
        return "–"
    digits = (lambda v: f"{v:.2f}") if metric == "top1" else (lambda v: f"{v:.3g}")
    point = digits(value) if metric == "top1" else f"{value:.4g}"
    return point if interval is None else f"{point} [{digits(interval[0])}, {digits(interval[1])}]"


def map_table(records: Iterable[Mapping[str, Any]], metric: str = "kl") -> Table:
    """One row per decoder layer, one column per pathway-group (:data:`COLUMNS`), values of ``metric`` with
    their 95% bootstrap interval over the prompts (records written before intervals: the value alone)."""
    records = list(records)
    layers, values = map_values(records, metric)
    intervals = {(int(r["cell"]["layer"]), f"{r['cell']['pathway']}-{r['cell']['group']}"):
                 (r.get("intervals") or {}).get(metric) for r in records if "layer" in r.get("cell", {})}
    header = ["layer"] + list(COLUMNS)
    return header, [[str(layer)] + [_fmt(v, metric, intervals.get((layer, column))) for v, column in zip(row, COLUMNS)]
                    for layer, row in zip(layers, values)]


def map_figure(records: Iterable[Mapping[str, Any]]):
    """-> Figure: two heat maps, layers down and pathway-group across: the KL (log colour scale) and the
    top-1 agreement."""
    from matplotlib.colors import LogNorm

    from .style import new_figure, style_context

    records = list(records)
    layers, kl = map_values(records, "kl")
    _, top1 = map_values(records, "top1")
    sparsity = next((r["cell"]["sparsity"] for r in records if "layer" in r["cell"]), None)
    positive = kl[np.isfinite(kl) & (kl > 0)]
    with style_context():
        fig = new_figure(7.0, max(3.0, 0.22 * len(layers) + 1.5))
        panels = fig.subplots(1, 2)
        floor = positive.min() if positive.size else 1e-6
        norm = LogNorm(vmin=floor, vmax=max(positive.max() if positive.size else 1.0, floor * 10))
        shown = [(panels[0], np.where(kl > 0, kl, floor), "viridis", norm, METRICS["kl"]),
                 (panels[1], top1, "magma", None, METRICS["top1"])]
        for ax, data, cmap, scale, label in shown:
            image = ax.imshow(data, aspect="auto", cmap=cmap, norm=scale, interpolation="nearest")
            ax.set_xticks(range(len(COLUMNS)), COLUMNS, rotation=35, ha="right")
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
            ax.set_ylabel("decoder layer")
            fig.colorbar(image, ax=ax, label=label, shrink=0.9)
        title = "Sensitivity map: one layer's path pruned"
        fig.suptitle(title if sparsity is None else f"{title} at {100 * sparsity:g}%")
    return fig
