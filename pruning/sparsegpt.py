"""SparseGPT (Frantar & Alistarh, 2023): prune one Linear with optimal-brain-surgeon updates.

Pure tensor math: takes a weight and a Hessian, returns the updated weight and its mask.
"""

from __future__ import annotations

import torch

from .errors import NumericalError
from .masks import lowest_mask, matrix_mask
from .registry import register_scorer
from .scores import STATS_DTYPE


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the inverse of the dampened Hessian.

    Returns (factor, dead) where ``dead`` marks input features never activated (diag 0): they get
    diag 1 here and their weights must be zeroed by the caller. Raises NumericalError when the
    dampened Hessian is not positive definite (no silent fallback).
    """
    h = hessian.to(STATS_DTYPE).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise NumericalError(
            f"SparseGPT: the Hessian (dampened by percdamp={percdamp}) is not positive definite "
            f"(Cholesky failed at column {int(info)}); raise percdamp, e.g. to {percdamp * 10:g}")
    factor = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    return factor, dead


def block_saliency(w: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / diag(Hinv)^2 of a column block: (out, cols) with (cols,) -> (out, cols)."""
    return w.pow(2) / hinv_diag.pow(2).unsqueeze(0)


def block_count(count: int, start: int, end: int, cols: int) -> int:
    """The share of ``count`` pruned weights that falls to columns [start, end) of ``cols``: differences of
    rounded cumulative shares, so the blocks' counts add up to ``count`` exactly."""
    return (count * end + cols // 2) // cols - (count * start + cols // 2) // cols


@register_scorer("sparsegpt", needs="hessian", updates_weights=True)
@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) given the Hessian (in, in) of its inputs.

    Columns are processed in blocks of ``blocksize``; the unstructured mask of a block is chosen
    across the whole block (so per-row sparsity varies), or N of every M columns per row with
    ``nm``. ``count`` (non-uniform allocations) prunes exactly that many weights of the matrix instead,
    each block its share by column span (:func:`block_count`). Returns (new_weight in the input dtype,
    mask with True = pruned).
    """
    if count is not None and nm:
        raise ValueError("an exact prune count cannot be combined with an N:M pattern")
    w = weight.detach().to(STATS_DTYPE).clone()
    rows, cols = w.shape
    hinv, dead = inverse_hessian_factor(hessian.to(w.device), percdamp)
    w[:, dead] = 0
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        block_hinv = hinv[start:end, start:end]
        saliency = None if nm else block_saliency(block, torch.diag(block_hinv))
        block_mask = (torch.zeros_like(block, dtype=torch.bool) if nm
                      else matrix_mask(saliency, sparsity) if count is None
                      else lowest_mask(saliency, block_count(count, start, end, cols)))
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if nm and i % nm[1] == 0:
                group = block_saliency(block[:, i:i + nm[1]], torch.diag(block_hinv)[i:i + nm[1]])
                low = torch.sort(group, dim=1, stable=True).indices[:, :nm[0]]
                block_mask.scatter_(1, i + low, True)
            col = block[:, i]
            kept = col.masked_fill(block_mask[:, i], 0)
            err = (col - kept) / block_hinv[i, i]
            block[:, i:] -= err.unsqueeze(1) * block_hinv[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = err
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
        mask[:, start:end] = block_mask
    w[mask] = 0
    return w.to(weight.dtype), mask
