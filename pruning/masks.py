"""Pruning masks from scores: pure functions. ``True`` marks a weight to prune.

Computing a mask and applying it are separate steps, so analysis can compare masks (IoU)
without pruning twice.
"""

from __future__ import annotations

import torch
from torch import nn


def row_mask_by_sort(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(in * sparsity)`` lowest scores of every output row (stable sort, so ties go to
    the lower column index). The reference definition; :func:`row_mask` computes the same faster.
    scores: (out, in) -> bool (out, in)."""
    n_prune = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_prune:
        order = torch.sort(scores, dim=1, stable=True).indices
        mask.scatter_(1, order[:, :n_prune], True)
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bit-identical to :func:`row_mask_by_sort` at a fraction of its cost (:func:`lowest_per_row`).
    scores: (out, in) -> bool (out, in)."""
    n_prune = int(scores.shape[1] * sparsity)
    if n_prune == 0 or bool(torch.isnan(scores).any()):
        return row_mask_by_sort(scores, sparsity)  # NaN orders last in a sort but not in kthvalue
    return lowest_per_row(scores, n_prune)


def lowest_per_row(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """The ``n_prune`` (1 <= n_prune <= in) lowest scores of every row, ties to the lower column, as a stable
    sort picks them: a k-th value per row, everything strictly below it, then the leftmost ties until the
    row's count is reached. Scores must hold no NaN (a sort orders NaN last, kthvalue does not).
    scores: (out, in) -> bool (out, in)."""
    threshold = scores.kthvalue(n_prune, dim=1, keepdim=True).values  # (out, 1)
    at_most = scores <= threshold
    if bool((at_most.sum(dim=1) == n_prune).all()):
        return at_most  # no row has a tie at its threshold (the usual case)
    mask = scores < threshold
    ties = scores == threshold
    missing = n_prune - mask.sum(dim=1, keepdim=True)  # (out, 1) >= 1: the threshold itself is a tie
    return mask | (ties & (ties.cumsum(dim=1) <= missing))


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(numel * sparsity)`` lowest scores of the whole matrix (per-layer comparison group)."""
    return lowest_mask(scores, int(scores.numel() * sparsity))


def lowest_mask_by_sort(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Prune the ``n_prune`` lowest scores of the whole matrix (stable sort: ties to the earlier entry in
    row-major order). The reference definition; :func:`lowest_mask` computes the same faster."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune:
        mask[torch.sort(scores.flatten(), stable=True).indices[:n_prune]] = True
    return mask.view_as(scores)


def lowest_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bit-identical to :func:`lowest_mask_by_sort` by a k-th value selection over the matrix read as one row
    (:func:`lowest_per_row`) instead of a full sort."""
    if n_prune <= 0 or n_prune >= scores.numel() or bool(torch.isnan(scores).any()):
        return lowest_mask_by_sort(scores, max(n_prune, 0))
    return lowest_per_row(scores.reshape(1, -1), n_prune).view_as(scores)


def count_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune exactly ``count`` weights of the matrix, spread over its rows: every row prunes its
    ``count // out`` lowest scores, and the ``count % out`` rows whose next-lowest score is smallest prune
    one more (stable sorts: ties to the lower column, then the lower row). With ``count`` a multiple of the
    rows this is :func:`row_mask` at sparsity ``count / numel``. Used by non-uniform allocations
    (:mod:`pruning.allocation`), which give each Linear an exact count.
    scores: (out, in) -> bool (out, in)."""
    rows, cols = scores.shape
    if not 0 <= count <= rows * cols:
        raise ValueError(f"count must be in [0, {rows * cols}] for a ({rows}, {cols}) matrix, got {count}")
    base, extra = divmod(count, rows)
    order = torch.sort(scores, dim=1, stable=True)
    per_row = torch.full((rows, 1), base, device=scores.device)
    if extra:
        chosen = torch.sort(order.values[:, base], stable=True).indices[:extra]
        per_row[chosen] += 1
    ranks = torch.arange(cols, device=scores.device).expand(rows, cols)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order.indices, ranks < per_row)


def nm_mask_by_sort(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M sparsity: in every group of ``m`` consecutive input columns of a row, prune the ``n`` lowest (stable
    sort: ties to the lower column). The reference definition; :func:`nm_mask` computes the same faster.

    scores: (out, in) with in divisible by m -> bool (out, in).
    """
    rows, cols = _check_groups(scores, m)
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[..., :n], True)
    return mask.reshape(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M sparsity, bit-identical to :func:`nm_mask_by_sort` without a sort (:func:`lowest_in_groups`).

    scores: (out, in) with in divisible by m -> bool (out, in).
    """
    rows, cols = _check_groups(scores, m)
    groups = scores.reshape(rows, cols // m, m).permute(2, 0, 1)  # (m, out, in / m)
    return lowest_in_groups(groups, n).permute(1, 2, 0).reshape(rows, cols)


def lowest_in_groups(groups: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` lowest along dim 0 of ``groups`` (m, ...), ties to the lower index, as a stable sort picks
    them: each entry's rank under that order (the entries below it, plus its equals at lower indices) from
    the m(m-1)/2 pairwise comparisons, ranks below ``n`` chosen. m > 16 or NaN (which a sort orders last)
    take the sort. groups: (m, ...) -> bool (m, ...)."""
    m = groups.shape[0]
    if m > 16 or bool(torch.isnan(groups).any()):
        mask = torch.zeros_like(groups, dtype=torch.bool)
        return mask.scatter_(0, torch.sort(groups, dim=0, stable=True).indices[:n], True)
    if groups.numel() * m <= 2**16:  # small (SparseGPT's one group per row): all pairs at once, fewer calls
        before = torch.ones(m, m, dtype=torch.bool, device=groups.device).tril(-1)  # [j, k]: k < j
        before = before.reshape(m, m, *[1] * (groups.dim() - 1))
        a, b = groups.unsqueeze(1), groups.unsqueeze(0)  # a[j, k] = groups[j], b[j, k] = groups[k]
        return ((b < a) | ((b == a) & before)).sum(dim=1) < n
    # each pair j < k adds 1 to the rank of exactly one of them: start k at its k earlier partners, move the 1
    # from k to j where the later entry orders first (strictly below; ties go to the earlier index)
    rank = torch.arange(m, dtype=torch.uint8, device=groups.device).reshape(m, *[1] * (groups.dim() - 1))
    rank = rank.expand(groups.shape).clone()
    for j in range(m):
        for k in range(j + 1, m):
            later_below = (groups[k] < groups[j]).view(torch.uint8)
            rank[j] += later_below
            rank[k] -= later_below
    return rank < n


def _check_groups(scores: torch.Tensor, m: int) -> tuple[int, int]:
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M needs the input dimension ({cols}) to be divisible by M={m}")
    return rows, cols


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                     count: int | None = None) -> torch.Tensor:
    """Per-row unstructured mask, the N:M mask when ``nm=(n, m)`` is given, or exactly ``count`` weights
    spread over the rows (:func:`count_mask`) when ``count`` is given."""
    if count is not None:
        if nm:
            raise ValueError("an exact prune count cannot be combined with an N:M pattern")
        return count_mask(scores, count)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


@torch.no_grad()
def apply_mask_(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the weights of ``linear`` where ``mask`` is True (in place, :func:`zero_where_`)."""
    zero_where_(linear.weight, mask.to(linear.weight.device))


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def zero_where_(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tensor.masked_fill_(mask, 0)`` bit for bit (+0.0 whatever the value was: -0.0, inf or NaN included), as a
    multiply of the floats' bit patterns, read as integers of the same width, by the keep mask (0 or 1):
    several times faster than masked_fill_ on CPUs. Other dtypes take masked_fill_."""
    bits = _SAME_WIDTH_INT.get(tensor.element_size()) if tensor.is_floating_point() else None
    if bits is None:
        return tensor.masked_fill_(mask, 0)
    tensor.view(bits).mul_(~mask)
    return tensor


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / weight.numel()
