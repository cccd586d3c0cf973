"""SparseGPT (Frantar & Alistarh, 2023): prune one Linear with optimal-brain-surgeon updates.

Pure tensor math: takes a weight and a Hessian, returns the updated weight and its mask.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .errors import NumericalError
from .masks import lowest_in_groups, lowest_mask, zero_where_
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


class _FactorCache:
    """Inverse factors of the Hessians still alive, keyed by the Hessian tensor itself (identity, not value):
    q/k/v (and gate/up) read one input, the engine hands them one Hessian, and the inversion is done once.
    An entry holds a weak reference, so it goes when its Hessian does; an in-place change of the Hessian
    (its version counter) or another percdamp or device recomputes."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: list[tuple[weakref.ref, int, float, torch.device, tuple[torch.Tensor, torch.Tensor]]] = []
        self.lock = threading.Lock()

    def get(self, hessian: torch.Tensor, percdamp: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if hessian.is_inference():  # no version counter to tell an in-place change: not cached
            return inverse_hessian_factor(hessian.to(device), percdamp)
        key = (hessian._version, percdamp, device)
        with self.lock:
            self.entries = [e for e in self.entries if e[0]() is not None]
            for ref, *found, factor in self.entries:
                if ref() is hessian and tuple(found) == key:
                    return factor
        factor = inverse_hessian_factor(hessian.to(device), percdamp)
        with self.lock:
            self.entries = [e for e in self.entries if e[0]() is not hessian][-(self.size - 1):]
            self.entries.append((weakref.ref(hessian), *key, factor))
        return factor


_FACTORS = _FactorCache()


def shared_inverse_factor(hessian: torch.Tensor, percdamp: float = 0.01,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`inverse_hessian_factor` on ``device`` (default: the Hessian's), computed once per Hessian tensor
    while it lives: calls with the same (unchanged) tensor get the same factor, bit for bit what a fresh
    computation gives. Callers must not modify the returned tensors."""
    return _FACTORS.get(hessian, percdamp, torch.device(device) if device is not None else hessian.device)


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
    across the whole block (so per-row sparsity varies): exactly ``int(out * block_cols * sparsity)``
    weights of the block, the lowest saliencies, ties to the earlier entry in row-major order (SparseGPT's
    reference code and llm-compressor prune every weight ``<=`` the k-th saliency instead, which prunes one
    weight more per block when a tie or the threshold itself is counted). With ``nm`` the N lowest of every
    M columns per row are pruned. ``count`` (non-uniform allocations) prunes exactly that many weights of
    the matrix instead, each block its share by column span (:func:`block_count`). Projections that read
    one input share one Hessian tensor and its inverse factor (:func:`shared_inverse_factor`).
    Returns (new_weight in the input dtype, mask with True = pruned).
    """
    if count is not None and nm:
        raise ValueError("an exact prune count cannot be combined with an N:M pattern")
    w = weight.detach().to(STATS_DTYPE).clone()
    rows, cols = w.shape
    hinv, dead = shared_inverse_factor(hessian, percdamp, w.device)
    w[:, dead] = 0
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block_hinv = hinv[start:end, start:end]
        if nm:
            block_mask = torch.zeros(end - start, rows, dtype=torch.bool, device=w.device)  # (block, out)
        else:
            saliency = block_saliency(w[:, start:end], torch.diag(block_hinv))  # (out, block): row-major ties
            n_prune = int(saliency.numel() * sparsity) if count is None else block_count(count, start, end, cols)
            block_mask = lowest_mask(saliency, n_prune).T.contiguous()
        block, errors = _obs_block(w[:, start:end].T.contiguous(), block_mask, block_hinv, nm)
        w[:, start:end] = block.T
        w[:, end:] -= errors.T.contiguous() @ hinv[start:end, end:]
        mask[:, start:end] = block_mask.T
    zero_where_(w, mask)
    return w.to(weight.dtype), mask


def _obs_block(block: torch.Tensor, block_mask: torch.Tensor, block_hinv: torch.Tensor,
               nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of columns, column by column (each column's error feeds the next): prune, and spread the
    error over the block's later columns (the rank-1 OBS update). Transposed, so a column is one contiguous
    row: block (cols, out) and block_mask (cols, out) are updated in place (with ``nm`` the mask of each
    group of M columns is chosen when the group is reached). Returns (block, errors (cols, out))."""
    errors = torch.empty_like(block)
    hinv_diag = torch.diag(block_hinv)
    for i in range(block.shape[0]):
        if nm and i % nm[1] == 0:
            group = block_saliency(block[i:i + nm[1]].T, hinv_diag[i:i + nm[1]])  # (out, M), a view of (M, out)
            block_mask[i:i + nm[1]] = lowest_in_groups(group.T, nm[0])
        col = block[i]
        kept = col.masked_fill(block_mask[i], 0)
        err = torch.div(col - kept, block_hinv[i, i], out=errors[i])
        block[i + 1:] -= block_hinv[i, i + 1:].unsqueeze(1) * err.unsqueeze(0)  # elementwise: the same bits as
        block[i] = kept  # (out, 1) * (1, cols); column i itself becomes ``kept``
    return block, errors
