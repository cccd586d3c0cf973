"""TAMP's adaptive multimodal input activation (AMIA) token selection, per Linear and per sample.

On the Linear's L2-normalised output tokens: a k=3 nearest-neighbour graph on cosine distance;
token score = the last query's attention (mean over heads) plus exp(-d)-weighted neighbour scores;
tokens are taken greedily (dampening the neighbours of each pick) until the RBF-kernel MMD^2
between the selected and all tokens falls under ``0.1 * sqrt(1 - density)``, where density is the
mean of the visual-visual, text-text and visual-text cosine similarities. Only the selected tokens
feed the statistics. Written from the published description and the ATV repository's
re-implementation (which, unlike TAMP's released code, computes the attention scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import CalibrationError
from .registry import register_pool

NEIGHBOURS = 3
DAMPING = 0.2
MMD_SCALE = 0.1


def modality_density(tokens: torch.Tensor, visual: torch.Tensor) -> float:
    """Mean of the vv, tt (positive upper-triangle entries, as the reference) and vt cosine similarities.
    tokens: (N, C) L2-normalised; visual: (N,) bool."""
    def upper_mean(x: torch.Tensor) -> float:
        sims = (x @ x.T).triu(diagonal=1)
        positive = sims[sims > 0]
        return float(positive.mean()) if positive.numel() else 0.0

    v, t = tokens[visual], tokens[~visual]
    return (upper_mean(v) + upper_mean(t) + float((v @ t.T).mean())) / 3


@register_pool("tamp", needs_visual=True, needs_attention=True)
def amia_select(outputs: torch.Tensor, visual: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Selected tokens of one sample for one Linear.

    outputs: (N, D) the Linear's outputs at the sample's valid tokens; visual: (N,) bool;
    attention: (N,) last-query attention averaged over heads. Returns (N,) bool.
    """
    if not bool(visual.any()) or bool(visual.all()):
        raise CalibrationError("the tamp pool needs samples with both text and visual tokens")
    x = F.normalize(outputs.float(), dim=-1)
    n = x.shape[0]
    distances = 1.0 - x @ x.T
    k = min(NEIGHBOURS, n - 1)
    neighbours = torch.topk(distances, k=k + 1, largest=False).indices[:, 1:]
    score = attention.float().to(x.device)
    graph = score + (torch.exp(-torch.gather(distances, 1, neighbours)) * score[neighbours]).sum(dim=1)
    sq = x.pow(2).sum(dim=1)
    kernel = torch.exp(-(sq[:, None] + sq[None, :] - 2.0 * x @ x.T) / 2.0)  # RBF, sigma 1
    k_xx = kernel.mean()
    col_sums = kernel.sum(dim=0)
    threshold = MMD_SCALE * (1.0 - modality_density(x, visual)) ** 0.5
    selected = torch.zeros(n, dtype=torch.bool, device=x.device)
    sum_xy, sum_yy, count = 0.0, 0.0, 0
    while count < n:
        pick = int(torch.argmax(graph))
        near = neighbours[pick]
        graph[near] -= torch.exp(-distances[pick, near] * DAMPING) * graph[pick].clamp(min=0)
        sum_yy += float(2.0 * kernel[pick, selected].sum() + kernel[pick, pick])
        sum_xy += float(col_sums[pick])
        selected[pick] = True
        count += 1
        graph[selected] = graph.min() - 1
        mmd2 = float(k_xx) + sum_yy / count**2 - 2.0 * sum_xy / (n * count)
        if mmd2 < threshold:
            break
    return selected
