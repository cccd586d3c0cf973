"""Calibration pools: which token positions feed the statistics. Pure functions on masks.

All masks are (B, T) bool. ``valid`` is False at padding, which never enters any pool.

ATV (activation-aware token selection) keeps every text token and adds, per sample, the ``k``
visual tokens that drift most through the (unpruned) block, drift = 1 - cos(x_in, x_out).
``k`` follows one of two rules:

* ``alpha`` rule (the reference code's default): ``k = round(min(1, alpha * d) * n_text)``, capped
  at the number of visual tokens, where ``d`` is the mean drift of *all* visual tokens of *all*
  calibration samples at this layer, so ``k`` adapts per layer;
* fixed ratio (the paper's summary: 5%-30% competitive, 10% default): ``k = round(ratio * n_visual)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import PoolParams, register_pool


def text_pool(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return valid & ~visual


def visual_pool(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return valid & visual


def drift(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-token drift 1 - cos(x_in, x_out) in fp32; (B, T, C) x2 -> (B, T). A token carried as several
    residual streams ((B, T, N, C), hyper-connections) is compared as one vector of N*C values."""
    return 1.0 - F.cosine_similarity(x_in.flatten(2).float(), x_out.flatten(2).float(), dim=-1)


def alpha_rule_k(n_text: int, n_visual: int, mean_drift: float, alpha: float) -> int:
    """The reference's layer-adaptive k (Python's round, as the reference)."""
    return min(n_visual, round(min(1.0, alpha * mean_drift) * n_text))


def ratio_rule_k(n_visual: int, ratio: float) -> int:
    """A fixed fraction of the sample's visual tokens."""
    return min(n_visual, round(ratio * n_visual))


def top_drift_visual(drift_row: torch.Tensor, visual_row: torch.Tensor, k: int) -> torch.Tensor:
    """(T,) bool: the ``k`` visual positions of one sample with the largest drift."""
    chosen = torch.zeros_like(visual_row)
    if k > 0:
        positions = visual_row.nonzero().squeeze(1)
        chosen[positions[torch.topk(drift_row[positions], k).indices]] = True
    return chosen


def random_visual(visual_row: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(T,) bool: ``k`` visual positions of one sample drawn uniformly (the ATV ablation)."""
    chosen = torch.zeros_like(visual_row)
    if k > 0:
        positions = visual_row.nonzero().squeeze(1)
        pick = torch.randperm(len(positions), generator=generator)[:k].to(positions.device)
        chosen[positions[pick]] = True
    return chosen


def sample_k(visual_row: torch.Tensor, text_row: torch.Tensor, mean_drift: float | None,
             alpha: float, ratio: float | None) -> int:
    """k for one sample under the fixed-ratio rule (``ratio`` set) or the alpha rule."""
    n_visual = int(visual_row.sum())
    if ratio is not None:
        return ratio_rule_k(n_visual, ratio)
    return alpha_rule_k(int(text_row.sum()), n_visual, float(mean_drift), alpha)


def atv_pool(visual: torch.Tensor, valid: torch.Tensor, drifts: torch.Tensor, *, alpha: float = 1.0,
             ratio: float | None = None, mean_drift: float | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int]]:
    """All text tokens + per sample the top-k visual tokens by drift (or k random ones when a
    ``generator`` is given: the random-visual ablation). Returns the pool and k per sample."""
    vis = visual_pool(visual, valid)
    text = text_pool(visual, valid)
    pool = text.clone()
    ks = []
    for b in range(visual.shape[0]):
        k = sample_k(vis[b], text[b], mean_drift, alpha, ratio)
        pick = random_visual(vis[b], k, generator) if generator is not None else top_drift_visual(drifts[b], vis[b], k)
        pool[b] |= pick
        ks.append(k)
    return pool, ks


# -- registered pools: fn(visual, valid, drifts, params) -> (pool (B, T) bool, k per sample) ----------------
@register_pool("all")
def all_tokens(visual: torch.Tensor, valid: torch.Tensor, drifts: torch.Tensor | None,
               params: PoolParams) -> tuple[torch.Tensor, list[int]]:
    """Every non-padding token (Wanda's pool)."""
    return valid, []


@register_pool("text")
def text_tokens(visual: torch.Tensor, valid: torch.Tensor, drifts: torch.Tensor | None,
                params: PoolParams) -> tuple[torch.Tensor, list[int]]:
    return text_pool(visual, valid), []


@register_pool("visual", needs_visual=True)
def visual_tokens(visual: torch.Tensor, valid: torch.Tensor, drifts: torch.Tensor | None,
                  params: PoolParams) -> tuple[torch.Tensor, list[int]]:
    return visual_pool(visual, valid), []


@register_pool("atv", needs_visual=True, needs_drift=True)
def atv_tokens(visual: torch.Tensor, valid: torch.Tensor, drifts: torch.Tensor,
               params: PoolParams) -> tuple[torch.Tensor, list[int]]:
    """Text + the top-k drifting visual tokens per sample."""
    return atv_pool(visual, valid, drifts, alpha=params.alpha, ratio=params.ratio, mean_drift=params.mean_drift)


@register_pool("random-visual", needs_visual=True, needs_drift=True)
def random_visual_tokens(visual: torch.Tensor, valid: torch.Tensor, drifts: torch.Tensor,
                         params: PoolParams) -> tuple[torch.Tensor, list[int]]:
    """Text + k random visual tokens per sample (ATV's k; the drifts give the alpha rule's mean drift)."""
    return atv_pool(visual, valid, drifts, alpha=params.alpha, ratio=params.ratio, mean_drift=params.mean_drift,
                    generator=params.generator)
