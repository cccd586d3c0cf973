"""Visual-token drift through each decoder block, ATV's k per sample, and the tokens ATV would select.

These are **dense-model** drifts: every layer is fed the unpruned previous layer's outputs. ATV
itself, while pruning, sees the outputs of the *pruned* earlier layers from layer 1 on, so its
drifts (and hence k and the selected tokens) after layer 0 differ somewhat from the ones shown here;
layer 0 is identical. The selection rule is the pruner's own (:func:`pruning.pools.atv_pool`):
all text tokens + per sample the top-k visual tokens by drift 1 - cos(x_in, x_out), with k from the
alpha rule ``round(min(1, alpha * d) * n_text)`` (d = mean visual drift of all samples at the layer)
or from a fixed ratio of the sample's visual tokens.

    data = collect_drift(model, batches, alpha=1.0)
    save_drift(data, "results/analysis/drift.pt", image=pil_image_of_sample_0, image_sample=0)
    summary, fig = drift_figure(load_drift("results/analysis/drift.pt"))
    fig2 = patch_overlay_figure(data, layers=(0, 8, 16))   # LLaVA-style square grids only

The dict (``drift.pt``; lists of tensors and plain numbers, weights_only-loadable)::

    {"layers": [0, 1, ...], "alpha": 1.0, "ratio": None | float, "model_type": str,
     "n_text": [int per sample], "n_visual": [int per sample],
     "drift": {layer: [(n_visual_b,) fp32 per sample]},      # visual tokens in sequence order
     "selected": {layer: [(n_visual_b,) bool per sample]},   # chosen by ATV's rule at that layer
     "k": {layer: [int per sample]}, "mean_drift": {layer: float},
     "image": None | (H, W, 3) uint8 tensor, "image_sample": int}   # optional, for the overlay
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from torch import nn

from pruning.adapters import get_adapter
from pruning.errors import CalibrationError, ConfigError
from pruning.pools import atv_pool, drift
from pruning.replay import capture, check_layers, replay_layers

from .records import load_saved
from .style import DENSE_COLOR, MODALITY_COLORS, PALETTE, new_figure, style_context

log = logging.getLogger(__name__)


# -- pure helpers --------------------------------------------------------------------------------
def grid_side(n_visual: int) -> int | None:
    """g when ``n_visual`` = g*g (one image's tokens form a square raster grid), else None."""
    side = math.isqrt(n_visual)
    return side if n_visual > 0 and side * side == n_visual else None


def overlay_layout(data: Mapping[str, Any], sample: int | None = None) -> tuple[int | None, str]:
    """(g, '') when the overlay can be drawn for ``sample`` (default: the saved image's), else (None, reason)."""
    sample = data.get("image_sample", 0) if sample is None else sample
    if data.get("image") is None:
        return None, "no input image was saved with the drift data (save_drift(..., image=...))"
    if not 0 <= sample < len(data["n_visual"]):
        return None, f"sample {sample} out of range: {len(data['n_visual'])} samples"
    n = int(data["n_visual"][sample])
    side = grid_side(n)
    if side is None:
        return None, (f"the {n} visual tokens of sample {sample} do not form a square grid (e.g. LLaVA-NeXT tiles "
                      "with newline tokens, several images, or Qwen-VL merged patches); the overlay needs "
                      "LLaVA-style g*g raster-order tokens")
    return side, ""


def to_uint8_image(image: Any) -> torch.Tensor:
    """PIL image / (H, W[, C]) array or tensor -> (H, W, 3) uint8 tensor (floats in [0, 1] are scaled)."""
    array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ConfigError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))


# -- collection (orchestration) ------------------------------------------------------------------
@torch.no_grad()
def collect_drift(model: nn.Module, batches: Sequence[Mapping[str, Any]], alpha: float = 1.0,
                  ratio: float | None = None, layers: Iterable[int] | None = None) -> dict[str, Any]:
    """Per layer and sample: visual-token drifts, ATV's k and selected tokens, on the dense model.

    batches: model-input dicts. Runs each batch through the decoder layers once (one batch's hidden
    states in memory at a time); k needs the mean drift of all samples, so the selection is made after
    all batches. Returns the dict of the module docstring (without the image; see :func:`save_drift`).
    """
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"ratio must be in [0, 1] or None, got {ratio}")
    batches = list(batches)
    if not batches:
        raise CalibrationError("collect_drift needs at least one calibration batch; none was given")
    adapter = get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    layers = check_layers(range(n_layers) if layers is None else layers, n_layers)
    model.eval()
    per_batch = []  # (visual (B,T), valid (B,T), {layer: drift (B,T)})
    for inputs in batches:
        batch = capture(model, adapter, inputs)
        drifts = {step.index: drift(step.inputs, step.outputs).cpu()
                  for step in replay_layers(model, adapter, [batch], range(layers[-1] + 1)) if step.index in layers}
        per_batch.append((batch.visual.cpu(), batch.valid.cpu(), drifts))
    if not any(bool((vis & val).any()) for vis, val, _ in per_batch):
        raise CalibrationError("the calibration batches have no visual tokens: there is no visual drift to show")
    data: dict[str, Any] = {"layers": layers, "alpha": float(alpha), "ratio": ratio,
                            "model_type": str(getattr(model.config, "model_type", "?")),
                            "n_text": [], "n_visual": [], "drift": {}, "selected": {}, "k": {}, "mean_drift": {}}
    for visual, valid, _ in per_batch:
        data["n_text"] += (valid & ~visual).sum(1).tolist()
        data["n_visual"] += (valid & visual).sum(1).tolist()
    for i in layers:
        mean = float(torch.cat([d[i][vis & val] for vis, val, d in per_batch]).mean())
        data["mean_drift"][i], data["drift"][i], data["selected"][i], data["k"][i] = mean, [], [], []
        for visual, valid, d in per_batch:
            pool, ks = atv_pool(visual, valid, d[i], alpha=alpha, ratio=ratio, mean_drift=mean)
            for b in range(visual.shape[0]):
                where = visual[b] & valid[b]
                data["drift"][i].append(d[i][b][where].float())
                data["selected"][i].append(pool[b][where])
                data["k"][i].append(int(ks[b]))
        log.info("layer %d: mean visual drift %.4f, k %s", i, mean, data["k"][i])
    data.update(image=None, image_sample=0)
    return data


def save_drift(data: Mapping[str, Any], path: str | Path, image: Any = None, image_sample: int = 0) -> Path:
    """``torch.save`` the collector's dict; ``image`` (PIL / array, the input image of ``image_sample``)
    is stored as an (H, W, 3) uint8 tensor for the patch overlay."""
    data = dict(data)
    if image is not None:
        if not 0 <= image_sample < len(data["n_visual"]):
            raise ConfigError(f"image_sample {image_sample} out of range: {len(data['n_visual'])} samples")
        data["image"], data["image_sample"] = to_uint8_image(image), int(image_sample)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


def load_drift(path: str | Path) -> dict[str, Any]:
    return load_saved(path, ("layers", "drift", "k", "selected", "n_visual"), "save_drift(collect_drift(...))")


# -- figures -------------------------------------------------------------------------------------
@dataclass
class DriftSummary:
    """Per layer: drift quartiles over all visual tokens, and k statistics over samples."""

    layers: list[int]
    median: list[float]
    mean_drift: list[float]
    k_mean: list[float]
    k_min: list[int]
    k_max: list[int]
    n_text_mean: float
    n_visual_mean: float


def drift_summary(data: Mapping[str, Any]) -> DriftSummary:
    layers = list(data["layers"])
    return DriftSummary(
        layers=layers,
        median=[float(torch.cat(data["drift"][i]).median()) for i in layers],
        mean_drift=[float(data["mean_drift"][i]) for i in layers],
        k_mean=[float(np.mean(data["k"][i])) for i in layers],
        k_min=[int(min(data["k"][i])) for i in layers],
        k_max=[int(max(data["k"][i])) for i in layers],
        n_text_mean=float(np.mean(data["n_text"])),
        n_visual_mean=float(np.mean(data["n_visual"])),
    )


def drift_figure(data: Mapping[str, Any]):
    """-> (DriftSummary, Figure): visual drift distribution per layer (box plot) and ATV's k per layer."""
    summary = drift_summary(data)
    layers = summary.layers
    rule = (f"fixed ratio {data['ratio']:g}" if data.get("ratio") is not None
            else f"alpha rule, alpha={data['alpha']:g}")
    step = max(1, len(layers) // 16)
    with style_context():
        fig = new_figure(max(7.0, 0.28 * len(layers) + 2.5), 6.5)
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.boxplot([torch.cat(data["drift"][i]).numpy() for i in layers], positions=layers, widths=0.6,
                    showfliers=False, patch_artist=True,
                    boxprops={"facecolor": MODALITY_COLORS["visual"], "alpha": 0.6},
                    medianprops={"color": "black"})
        top.plot(layers, summary.mean_drift, "o-", color=PALETTE[3], markersize=3, label="mean drift d")
        top.set_ylabel("drift 1 − cos(x_in, x_out)")
        top.set_title("Visual-token drift per block (boxes: quartiles and median; whiskers: 1.5 IQR)")
        top.legend(loc="best")
        bottom.fill_between(layers, summary.k_min, summary.k_max, color=PALETTE[0], alpha=0.25,
                            label="k, min–max over samples")
        bottom.plot(layers, summary.k_mean, "o-", color=PALETTE[0], markersize=3, label="k, mean over samples")
        bottom.axhline(summary.n_text_mean, color=PALETTE[2], linestyle="--",
                       label=f"text tokens per sample (mean {summary.n_text_mean:.0f}; the alpha rule's cap)")
        top_k = max(summary.n_text_mean, max(summary.k_max))
        if summary.n_visual_mean <= 1.5 * top_k:  # else the line would squash k to the bottom of the panel
            bottom.axhline(summary.n_visual_mean, color=DENSE_COLOR, linestyle=":",
                           label=f"visual tokens per sample (mean {summary.n_visual_mean:.0f})")
            top_k = max(top_k, summary.n_visual_mean)
        bottom.set_ylabel(f"selected visual tokens k\n(of {summary.n_visual_mean:.0f} per sample, mean)")
        bottom.set_xlabel("decoder layer")
        bottom.set_title(f"ATV's k per sample ({rule})")
        bottom.set_xticks(layers[::step], [str(i) for i in layers[::step]])
        bottom.set_ylim(0, 1.08 * top_k)
        bottom.yaxis.set_major_locator(MaxNLocator(integer=True))  # k counts tokens
        fig.legend(*bottom.get_legend_handles_labels(), loc="outside lower center", ncol=2)
        fig.suptitle("ATV's visual-token selection on the dense model")
    return summary, fig


def default_overlay_layers(layers: Sequence[int], count: int = 4) -> list[int]:
    """``count`` layers spread evenly over ``layers`` (first and last included)."""
    if len(layers) <= count:
        return list(layers)
    picks = np.linspace(0, len(layers) - 1, count).round().astype(int)
    return [layers[p] for p in dict.fromkeys(picks.tolist())]


def patch_overlay_figure(data: Mapping[str, Any], layers: Sequence[int] | None = None, sample: int | None = None):
    """Selected visual tokens drawn over the input image at a few layers (square-grid layouts only).

    The grid is stretched over the whole saved image, so save the image as the vision tower saw it
    (after the processor's resize / centre crop).

    Row 1: the token drift as a heat map over the image; row 2: the image with the k selected patches
    outlined and the others dimmed. Raises ConfigError when :func:`overlay_layout` says the layout is
    not a square grid or no image was saved (check it first to skip gracefully).
    """
    sample = int(data.get("image_sample", 0)) if sample is None else sample
    side, reason = overlay_layout(data, sample)
    if side is None:
        raise ConfigError(f"cannot draw the patch overlay: {reason}")
    layers = default_overlay_layers(list(data["layers"])) if layers is None else list(layers)
    unknown = [i for i in layers if i not in data["drift"]]
    if unknown or not layers:
        raise ConfigError(f"layers {unknown or '(none)'} have no drift data (have {list(data['layers'])})")
    image = np.asarray(data["image"])
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    vmax = max(float(data["drift"][i][sample].max()) for i in layers)
    with style_context():
        panel = 2.4  # inches per image panel; the height follows the image's aspect
        fig = new_figure(panel * len(layers) + 1.2, 2 * panel * height / width + 1.3)
        axes = fig.subplots(2, len(layers), squeeze=False)
        heat = None
        for col, i in enumerate(layers):
            values = data["drift"][i][sample].reshape(side, side).numpy()
            chosen = data["selected"][i][sample].reshape(side, side).numpy()
            top, bottom = axes[0, col], axes[1, col]
            top.imshow(image, extent=extent)
            heat = top.imshow(values, extent=extent, cmap="magma", alpha=0.6, vmin=0.0, vmax=vmax,
                              interpolation="nearest")
            top.set_title(f"layer {i}: drift")
            bottom.imshow(image, extent=extent)
            bottom.imshow(np.where(chosen, np.nan, 1.0), extent=extent, cmap="gray_r", alpha=0.65, vmin=0, vmax=1,
                          interpolation="nearest")
            _outline(bottom, chosen, width / side, height / side)
            bottom.set_title(f"layer {i}: k = {int(chosen.sum())} of {side * side}")
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
        axes[0, 0].set_ylabel("drift heat map")
        axes[1, 0].set_ylabel("selected (bright, outlined)")
        # one colour bar beside both rows (anchored to the top row it describes) keeps the columns aligned
        fig.colorbar(heat, ax=axes.ravel().tolist(), label="drift 1 − cos (top row)", shrink=0.45, anchor=(0.0, 1.0))
        fig.suptitle(f"Visual tokens ATV selects, sample {sample} ({side}×{side} patch grid, dense model)")
    return fig


def _outline(ax, chosen: np.ndarray, cell_w: float, cell_h: float) -> None:
    from matplotlib.patches import Rectangle

    for row, col in zip(*np.nonzero(chosen)):
        ax.add_patch(Rectangle((col * cell_w, row * cell_h), cell_w, cell_h, fill=False, edgecolor=PALETTE[8],
                               linewidth=1.2))
