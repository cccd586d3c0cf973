"""Text vs visual hidden states at the input of chosen decoder layers, embedded with t-SNE.

Collection (model needed) and embedding/plotting (no model) are separate, so the figure can be
regenerated from ``hidden_states.pt``:

    states = collect_hidden_states(model, batches, layers=(0, 8, 16), max_per_modality=1000, seed=0)
    save_hidden_states(states, "results/analysis/hidden_states.pt")
    result, fig = tsne_figure(load_hidden_states("results/analysis/hidden_states.pt"), seed=0)

The states dict (plain tensors and ints, loadable with ``torch.load(weights_only=True)``)::

    {"layers": [0, 8, 16],                         # decoder layer indices (their *inputs*)
     "states": {0: {"text": (N_t, C) fp32, "visual": (N_v, C) fp32}, ...},
     "totals": {"text": int, "visual": int},       # valid tokens available per modality
     "max_per_modality": int | None, "seed": int, "model_type": str}

The same token positions are kept at every layer, so the layers' panels show the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pruning.adapters import get_adapter
from pruning.errors import CalibrationError, ConfigError
from pruning.replay import capture, check_layers, replay_layers

from .records import load_saved
from .style import MODALITY_COLORS, new_figure, style_context

log = logging.getLogger(__name__)

MODALITIES = ("text", "visual")


# -- pure helpers --------------------------------------------------------------------------------
def modality_masks(visual: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, T) bool x2 -> {"text": (B, T), "visual": (B, T)}; padding is in neither."""
    return {"text": valid & ~visual, "visual": valid & visual}


def choose_subsample(total: int, limit: int | None, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``min(total, limit)`` positions drawn uniformly without replacement from ``total``."""
    if limit is None or total <= limit:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:limit].sort().values


def split_by_batch(indices: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Global indices into the concatenation of batches with ``counts`` items -> local indices per batch."""
    out, start = [], 0
    for count in counts:
        inside = indices[(indices >= start) & (indices < start + count)]
        out.append(inside - start)
        start += count
    return out


# -- collection (orchestration) ------------------------------------------------------------------
@torch.no_grad()
def collect_hidden_states(model: nn.Module, batches: Sequence[Mapping[str, Any]], layers: Iterable[int],
                          max_per_modality: int | None = 1000, seed: int = 0) -> dict[str, Any]:
    """Hidden states at the input of each of ``layers`` for text and visual tokens (dense model).

    batches: model-input dicts (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
    max_per_modality: at most this many tokens per modality, drawn uniformly with ``seed`` over all
    valid tokens of all batches (the same positions at every layer); None keeps every token.
    Padding never enters (``CapturedBatch.valid``). Returns the dict described in the module docstring.
    """
    if max_per_modality is not None and max_per_modality < 1:
        raise ConfigError(f"max_per_modality must be >= 1 or None, got {max_per_modality}")
    batches = list(batches)
    if not batches:
        raise CalibrationError("collect_hidden_states needs at least one calibration batch; none was given")
    adapter = get_adapter(model)
    layers = check_layers(layers, len(adapter.decoder_layers(model)))
    model.eval()
    # Modality masks come from the inputs alone, so the subsample is drawn before any forward.
    masks = [modality_masks(adapter.visual_mask_of(model, b).cpu(), _valid(b)) for b in batches]
    generator = torch.Generator().manual_seed(seed)
    picks = {}
    totals = {}
    for modality in MODALITIES:
        counts = [int(m[modality].sum()) for m in masks]
        totals[modality] = sum(counts)
        picks[modality] = split_by_batch(choose_subsample(totals[modality], max_per_modality, generator), counts)
    if totals["visual"] == 0:
        log.warning("the calibration batches have no visual tokens; the t-SNE will show text only")
    found: dict[int, dict[str, list[torch.Tensor]]] = {i: {m: [] for m in MODALITIES} for i in layers}
    for j, inputs in enumerate(batches):
        batch = capture(model, adapter, inputs)
        # the last layer is replayed too (its outputs unused): one loop for every consumer of captured inputs
        for step in replay_layers(model, adapter, [batch], range(layers[-1] + 1)):
            if step.index in found:
                flat = step.inputs.float().cpu()
                for modality in MODALITIES:
                    found[step.index][modality].append(flat[masks[j][modality]][picks[modality][j]])
    states = {i: {m: torch.cat(found[i][m]) for m in MODALITIES} for i in layers}
    log.info("hidden states: %s text / %s visual tokens per layer (of %s / %s)", len(states[layers[0]]["text"]),
             len(states[layers[0]]["visual"]), totals["text"], totals["visual"])
    return {"layers": layers, "states": states, "totals": totals, "max_per_modality": max_per_modality,
            "seed": seed, "model_type": str(getattr(model.config, "model_type", "?"))}


def _valid(inputs: Mapping[str, Any]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    return mask.bool().cpu() if mask is not None else torch.ones_like(ids, dtype=torch.bool).cpu()


def save_hidden_states(states: Mapping[str, Any], path: str | Path) -> Path:
    """Write the collector's dict with ``torch.save`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(states), path)
    return path


def load_hidden_states(path: str | Path) -> dict[str, Any]:
    """Read a dict written by :func:`save_hidden_states` (tensors and ints only: weights_only load)."""
    states = load_saved(path, ("layers", "states"), "save_hidden_states")
    _check_states(states)
    return states


def _check_states(states: Mapping[str, Any]) -> None:
    missing = [k for k in ("layers", "states") if k not in states]
    if missing:
        raise ConfigError(f"hidden states dict lacks {missing}; build it with collect_hidden_states")
    if not isinstance(states["states"], Mapping) or not isinstance(states["layers"], (list, tuple)):
        raise ConfigError("hidden states dict must map 'layers' to a list and 'states' to a dict of layers; "
                          "build it with collect_hidden_states")
    for i in states["layers"]:
        if set(states["states"].get(i, {})) != set(MODALITIES):
            raise ConfigError(f"hidden states of layer {i} must hold 'text' and 'visual' tensors")


# -- embedding and figure ------------------------------------------------------------------------
@dataclass
class TsneResult:
    """2-D embedding per layer: ``coords[i]`` (N, 2) and ``labels[i]`` (N,) of 'text' / 'visual'."""

    layers: list[int]
    coords: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]
    seed: int


def embed_layer(text: torch.Tensor, visual: torch.Tensor, seed: int, perplexity: float = 30.0,
                pca_dim: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(N_t, C), (N_v, C) -> coords (N_t + N_v, 2), labels (N_t + N_v,).

    PCA to ``pca_dim`` first (speed, and removes noise), then Barnes-Hut t-SNE with PCA initialisation
    (deterministic; ``seed`` drives scikit-learn's randomized solvers). The perplexity is capped below
    the number of points, as scikit-learn requires.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = torch.cat([text.float(), visual.float()]).numpy().astype(np.float64)
    labels = np.array(["text"] * len(text) + ["visual"] * len(visual))
    n = len(x)
    if n < 4:
        raise ConfigError(f"t-SNE needs at least 4 tokens, got {n} ({len(text)} text, {len(visual)} visual)")
    dim = min(pca_dim, n, x.shape[1])
    if dim < x.shape[1]:
        x = PCA(n_components=dim, random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca", random_state=seed,
                max_iter=1000)
    # One thread: Barnes-Hut's OpenMP threads made it ~20x slower on a shared, busy machine (measured:
    # 17 s vs 0.7 s for 112 points), and a single thread keeps the result independent of the core count.
    with threadpool_limits(1):
        return tsne.fit_transform(x), labels


def tsne_embed(states: Mapping[str, Any], seed: int = 0, perplexity: float = 30.0) -> TsneResult:
    """Embed every layer of a :func:`collect_hidden_states` dict; same seed -> same coordinates."""
    _check_states(states)
    coords, labels = {}, {}
    for i in states["layers"]:
        coords[i], labels[i] = embed_layer(states["states"][i]["text"], states["states"][i]["visual"], seed, perplexity)
    return TsneResult(list(states["layers"]), coords, labels, seed)


def tsne_figure(states: Mapping[str, Any], seed: int = 0, perplexity: float = 30.0):
    """-> (TsneResult, Figure): one scatter panel per layer, points coloured by modality."""
    result = tsne_embed(states, seed, perplexity)
    n = len(result.layers)
    cols = min(n, 3)
    rows = -(-n // cols)
    with style_context():
        fig = new_figure(3.2 * cols, 3.0 * rows + 0.4)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, i in zip(axes.flat, result.layers):
            for modality in MODALITIES:
                pts = result.coords[i][result.labels[i] == modality]
                ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, color=MODALITY_COLORS[modality], linewidths=0,
                           label=f"{modality} ({len(pts)})")
            ax.set_title(f"input of layer {i}")
            ax.set_xlabel("t-SNE 1 (a.u.)")
            ax.set_ylabel("t-SNE 2 (a.u.)")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        # one legend for all panels (the same tokens at every layer), outside so it hides no point
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, markerscale=2.5,
                   title="tokens (count per layer)")
        fig.suptitle(f"Text vs visual hidden states (t-SNE, seed {seed})")
    return result, fig
