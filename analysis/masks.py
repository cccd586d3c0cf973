"""How much do the masks of different calibration pools agree? IoU of the pruned sets per Linear.

    pool_masks = collect_pool_masks(model, batches, pools=("text", "visual", "all"), sparsity=0.5)
    save_pool_masks(pool_masks, "results/analysis/pool_masks.pt")
    tables = pool_iou(pool_masks)                    # {"text vs visual": [IouRow, ...], ...}
    fig = iou_figure(tables)

``collect_pool_masks`` returns (and ``pool_masks.pt`` holds, with masks bit-packed)::

    {"method": "wanda", "sparsity": 0.5, "pools": ["text", "visual", "all"],
     "masks": {pool: {full dotted Linear name: (out, in) bool, True = pruned}}}

Masks come from :func:`pruning.engine.compute_masks`, so the schedule is the pruner's own (later
layers see inputs propagated through the pruned earlier layers of *that* pool); weights are untouched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pruning.config import PruneConfig
from pruning.errors import ConfigError

from .records import load_saved
from .style import color_for, new_figure, style_context

log = logging.getLogger(__name__)

MASK_POOLS = ("text", "visual", "all", "atv", "random-visual")
DEFAULT_PAIRS = (("text", "visual"), ("all", "text"))
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


# -- pure math -----------------------------------------------------------------------------------
def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∧ b| / |a ∨ b| of two bool masks of the same shape (True = pruned); 1.0 when both are empty.

    Args:
        a: a bool mask.
        b: a bool mask of the same shape.

    Returns:
        The intersection over union, in [0, 1].
    """
    if a.shape != b.shape:
        raise ConfigError(f"masks must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    if union == 0:
        return 1.0
    return int((a & b).sum()) / union


def split_name(name: str) -> tuple[int, str]:
    """'model.language_model.layers.3.self_attn.q_proj' -> (3, 'q_proj')."""
    match = _LAYER_RE.search(name)
    if match is None:
        raise ConfigError(f"cannot find a layer index in Linear name {name!r}")
    return int(match.group(1)), match.group(2).rsplit(".", 1)[-1]


@dataclass(frozen=True)
class IouRow:
    name: str          # full dotted Linear name
    layer: int         # decoder layer index
    projection: str    # q_proj, ..., down_proj
    iou: float


def iou_table(masks_a: Mapping[str, torch.Tensor], masks_b: Mapping[str, torch.Tensor]) -> list[IouRow]:
    """Per Linear (the same names on both sides): (layer, projection, IoU), ordered by layer then name order."""
    if not masks_a:
        raise ConfigError("iou_table needs at least one mask, got none")
    if set(masks_a) != set(masks_b):
        only = sorted(set(masks_a) ^ set(masks_b))
        raise ConfigError(f"the two mask sets cover different Linears, e.g. {only[:3]}")
    rows = [IouRow(name, *split_name(name), mask_iou(masks_a[name], masks_b[name])) for name in masks_a]
    return sorted(rows, key=lambda r: r.layer)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(…) bool -> (ceil(n/8),) uint8, 8 entries per byte (for saving; see :func:`unpack_mask`)."""
    return torch.from_numpy(np.packbits(mask.bool().cpu().numpy().reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy())[:n].astype(bool)).reshape(tuple(shape))


# -- collection (orchestration) ------------------------------------------------------------------
def collect_pool_masks(model: nn.Module, batches: Sequence[Mapping[str, Any]],
                       pools: Sequence[str] = ("text", "visual", "all"), sparsity: float = 0.5,
                       method: str = "wanda", **config: Any) -> dict[str, Any]:
    """Masks of every decoder Linear for each calibration pool; the model's weights are left untouched.

    ``method`` must use activations ('wanda' or 'sparsegpt'); extra keyword arguments go to
    :class:`pruning.config.PruneConfig` (e.g. ``pattern='2:4'``, ``seed``). Returns the dict of the
    module docstring.
    """
    from pruning.engine import compute_masks

    pools = list(pools)
    bad = [p for p in pools if p not in MASK_POOLS]
    if bad or not pools:
        raise ConfigError(f"unknown pool {bad or '(none)'}; choose from {list(MASK_POOLS)}")
    if method not in ("wanda", "sparsegpt"):
        raise ConfigError(f"method must be 'wanda' or 'sparsegpt' (a scorer that uses the pool), got {method!r}")
    masks = {}
    for pool in pools:
        report = compute_masks(model, PruneConfig(method, sparsity=sparsity, pool=pool, **config), batches,
                               progress=False)
        masks[pool] = report.masks
        log.info("pool %s: %d masks, mean sparsity %.4f", pool, len(report.masks), report.sparsity)
    return {"method": method, "sparsity": float(sparsity), "pools": pools, "masks": masks}


def save_pool_masks(pool_masks: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` with bit-packed masks (1 bit per weight) plus their shapes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packed = {pool: {name: pack_mask(m) for name, m in masks.items()} for pool, masks in pool_masks["masks"].items()}
    shapes = {name: list(m.shape) for masks in pool_masks["masks"].values() for name, m in masks.items()}
    torch.save({"method": pool_masks["method"], "sparsity": pool_masks["sparsity"], "pools": list(pool_masks["pools"]),
                "packed": packed, "shapes": shapes}, path)
    return path


def load_pool_masks(path: str | Path) -> dict[str, Any]:
    saved = load_saved(path, ("method", "sparsity", "pools", "packed", "shapes"), "save_pool_masks")
    try:
        masks = {pool: {name: unpack_mask(p, saved["shapes"][name]) for name, p in packed.items()}
                 for pool, packed in saved["packed"].items()}
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:  # foreign 'packed' / 'shapes'
        raise ConfigError(f"{path}: 'packed' and 'shapes' are not the bit-packed masks save_pool_masks writes "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    return {"method": saved["method"], "sparsity": saved["sparsity"], "pools": saved["pools"], "masks": masks}


def pool_iou(pool_masks: Mapping[str, Any], pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS
             ) -> dict[str, list[IouRow]]:
    """{"A vs B": iou_table(masks[A], masks[B])} for each pair whose pools were both collected."""
    masks = pool_masks["masks"]
    unknown = sorted({p for pair in pairs for p in pair} - set(masks))
    if unknown:
        raise ConfigError(f"pools {unknown} were not collected (have {sorted(masks)})")
    return {f"{a} vs {b}": iou_table(masks[a], masks[b]) for a, b in pairs}


# -- figure --------------------------------------------------------------------------------------
def iou_matrix(rows: Sequence[IouRow]) -> tuple[list[int], list[str], np.ndarray]:
    """Rows -> (layers, projections, (n_layers, n_projections) IoU with NaN where absent)."""
    layers = sorted({r.layer for r in rows})
    projections = list(dict.fromkeys(r.projection for r in rows))
    grid = np.full((len(layers), len(projections)), np.nan)
    for r in rows:
        grid[layers.index(r.layer), projections.index(r.projection)] = r.iou
    return layers, projections, grid


def iou_figure(tables: Mapping[str, Sequence[IouRow]], sparsity: float | None = None, method: str | None = None):
    """Distribution of IoU over Linears per pair (violin + points) and a layer x projection heat map per pair."""
    if not tables:
        raise ConfigError("iou_figure needs at least one pair of pools")
    labels = list(tables)
    values = [np.array([r.iou for r in tables[label]]) for label in labels]
    matrices = [iou_matrix(tables[label]) for label in labels]
    n_layers = max(len(m[0]) for m in matrices)
    low = float(np.nanmin(np.concatenate(values)))
    vmin = max(0.0, np.floor(low * 20) / 20)  # round down to 0.05 so the colour bar has clean ticks
    heat_height = max(2.2, 0.15 * n_layers + 1.2)
    with style_context():
        fig = new_figure(max(6.5, 3.0 * len(labels) + 1.0), 2.8 + heat_height)
        top, bottom = fig.subfigures(2, 1, height_ratios=[2.8, heat_height])
        ax = top.subplots()
        parts = ax.violinplot(values, showmedians=True, showextrema=False)
        for k, body in enumerate(parts["bodies"]):
            body.set_facecolor(color_for(k))
            body.set_alpha(0.45)
        parts["cmedians"].set_color("black")
        rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
        for k, v in enumerate(values):
            ax.scatter(k + 1 + rng.uniform(-0.08, 0.08, len(v)), v, s=8 if len(v) <= 50 else 3,
                       alpha=1.0 if len(v) <= 50 else 0.6, color=color_for(k), zorder=3, linewidths=0)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_ylabel("mask IoU (pruned sets)")
        ax.set_xlabel("calibration pools compared (all = every token, as Wanda)")
        ax.set_ylim(min(vmin, ax.get_ylim()[0]), 1.02)
        what = " ".join(x for x in [method, f"{100 * sparsity:g}% sparsity" if sparsity is not None else None] if x)
        ax.set_title(f"IoU over {len(values[0])} decoder Linears" + (f" ({what})" if what else ""))
        axes = bottom.subplots(1, len(labels), squeeze=False)[0]
        image = None
        for ax, label, (layers, projections, grid) in zip(axes, labels, matrices):
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=1.0, interpolation="nearest")
            ax.set_xticks(range(len(projections)), projections, rotation=45, ha="right")
            step = max(1, len(layers) // 16)
            ax.set_yticks(range(0, len(layers), step), [str(index) for index in layers[::step]])
            ax.set_xlabel("projection")
            ax.set_ylabel("decoder layer")
            ax.set_title(label)
            ax.grid(False)
            if len(layers) * len(projections) <= 64:
                for (y, x), v in np.ndenumerate(grid):
                    if not np.isnan(v):
                        ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if v < vmin + 0.6 * (1 - vmin) else "black")
        bottom.colorbar(image, ax=list(axes), label="mask IoU", shrink=0.9)
        fig.suptitle("Agreement of masks from different calibration pools")
    return fig
