"""Importance scores of weights: pure functions, no hooks, no models.

A higher score means more important; the lowest scores are pruned.
"""

from __future__ import annotations

import torch

from .registry import register_scorer

# Statistics and scores are computed in fp32 whatever the model dtype.
STATS_DTYPE = torch.float32


@register_scorer("magnitude", needs=None)
def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|, shape (out, in)."""
    return weight.detach().to(STATS_DTYPE).abs()


@register_scorer("wanda", needs="sq_norms")
def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda score |W_ij| * ||X_j||_2.

    weight: (out, in); sq_norms: (in,) the (mean per sample) squared L2 norm of each input feature
    over the calibration tokens. Returns (out, in) fp32.
    """
    if sq_norms.shape != weight.shape[1:]:
        raise ValueError(f"sq_norms must have shape ({weight.shape[1]},), got {tuple(sq_norms.shape)}")
    return magnitude_scores(weight) * sq_norms.to(device=weight.device, dtype=STATS_DTYPE).sqrt().unsqueeze(0)
