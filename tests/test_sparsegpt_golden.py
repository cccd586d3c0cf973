"""Golden test of SparseGPT: the toolkit's routine against a frozen copy of the per-matrix routine as it was
before the speed work (commit 58dc2ed), kept here as the reference. Weights and masks must be bitwise equal,
on single matrices (ties, dead inputs, partial blocks, counts, N:M, half-precision weights) and through the
engine on a tiny model whose q/k/v and gate/up read one input (so they share one Hessian)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build_tiny

from pruning import PruneConfig, compute_masks, prune_
from pruning.registry import SCORERS, Scorer
from pruning.sparsegpt import sparsegpt_prune


# -- the reference: pruning/sparsegpt.py and the masks it used, as of commit 58dc2ed -------------------------
def _ref_lowest_mask(scores, n_prune):
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune:
        mask[torch.sort(scores.flatten(), stable=True).indices[:n_prune]] = True
    return mask.view_as(scores)


def _ref_inverse_hessian_factor(hessian, percdamp=0.01):
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    chol, info = torch.linalg.cholesky_ex(h)
    assert int(info) == 0
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True), dead


def _ref_block_saliency(w, hinv_diag):
    return w.pow(2) / hinv_diag.pow(2).unsqueeze(0)


def _ref_block_count(count, start, end, cols):
    return (count * end + cols // 2) // cols - (count * start + cols // 2) // cols


@torch.no_grad()
def reference_sparsegpt_prune(weight, hessian, sparsity, nm=None, blocksize=128, percdamp=0.01, count=None):
    w = weight.detach().to(torch.float32).clone()
    rows, cols = w.shape
    hinv, dead = _ref_inverse_hessian_factor(hessian.to(w.device), percdamp)
    w[:, dead] = 0
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        block_hinv = hinv[start:end, start:end]
        saliency = None if nm else _ref_block_saliency(block, torch.diag(block_hinv))
        block_mask = (torch.zeros_like(block, dtype=torch.bool) if nm
                      else _ref_lowest_mask(saliency, int(saliency.numel() * sparsity)) if count is None
                      else _ref_lowest_mask(saliency, _ref_block_count(count, start, end, cols)))
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if nm and i % nm[1] == 0:
                group = _ref_block_saliency(block[:, i:i + nm[1]], torch.diag(block_hinv)[i:i + nm[1]])
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


# -- single matrices -----------------------------------------------------------------------------------------
def _problem(rows, cols, seed, ties=False, dead=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols ** 0.5
    if dead:
        x[:, torch.randperm(cols, generator=g)[:dead]] = 0  # inputs never activated: diag(H) = 0
    hessian = 2 * x.T @ x / 4
    weight = (torch.randint(-2, 3, (rows, cols), generator=g).float() if ties  # few distinct values: many ties
              else torch.randn(rows, cols, generator=g))
    return weight.to(dtype), hessian


CASES = [  # (rows, cols, blocksize, sparsity, nm, count, ties, dead, dtype)
    (48, 96, 32, 0.5, None, None, False, 0, torch.float32),
    (48, 200, 128, 0.5, None, None, False, 3, torch.float32),   # a partial last block, dead inputs
    (40, 64, 16, 0.7, None, None, False, 0, torch.float32),
    (32, 64, 16, 0.5, None, None, True, 0, torch.float32),      # ties at the block threshold
    (32, 64, 64, 0.5, None, None, True, 2, torch.float32),      # ties, dead inputs, one block
    (48, 96, 32, 0.5, (2, 4), None, False, 0, torch.float32),
    (32, 64, 16, 0.5, (2, 4), None, True, 2, torch.float32),    # N:M with ties
    (24, 48, 48, 0.5, (1, 4), None, False, 0, torch.float32),
    (48, 100, 32, 0.5, None, 1234, False, 0, torch.float32),    # an exact count, uneven blocks
    (32, 64, 16, 0.5, None, 777, True, 0, torch.float32),
    (48, 96, 32, 0.5, None, None, False, 0, torch.bfloat16),
    (48, 96, 32, 0.5, (2, 4), None, False, 0, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_sparsegpt_equals_the_reference_routine_bitwise(case):
    rows, cols, blocksize, sparsity, nm, count, ties, dead, dtype = case
    for seed in range(3):
        weight, hessian = _problem(rows, cols, seed, ties, dead, dtype)
        expected_w, expected_mask = reference_sparsegpt_prune(weight, hessian, sparsity, nm, blocksize,
                                                              count=count)
        new_w, mask = sparsegpt_prune(weight, hessian, sparsity, nm, blocksize, count=count)
        assert new_w.dtype == weight.dtype
        assert torch.equal(mask, expected_mask)
        assert torch.equal(new_w, expected_w)


def test_sharing_one_hessian_across_matrices_equals_separate_runs():
    """Projections reading one input (q/k/v) get the same Hessian tensor: each result equals a run on its own
    copy of the Hessian, whatever the order of the calls."""
    g = torch.Generator().manual_seed(5)
    _, hessian = _problem(8, 96, 5)
    weights = [torch.randn(r, 96, generator=g) for r in (48, 24, 24)]
    shared = [sparsegpt_prune(w, hessian, 0.5, blocksize=32) for w in weights]
    for w, (new_w, mask) in zip(weights, shared):
        expected_w, expected_mask = reference_sparsegpt_prune(w, hessian.clone(), 0.5, blocksize=32)
        assert torch.equal(mask, expected_mask) and torch.equal(new_w, expected_w)
    hessian.mul_(3.0)  # the same tensor changed in place: no stale inverse may be used
    new_w, mask = sparsegpt_prune(weights[0], hessian, 0.5, blocksize=32)
    expected_w, expected_mask = reference_sparsegpt_prune(weights[0], hessian.clone(), 0.5, blocksize=32)
    assert torch.equal(mask, expected_mask) and torch.equal(new_w, expected_w)


# -- through the engine --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_engine_sparsegpt_equals_the_reference_routine_bitwise(monkeypatch, pattern):
    """A tiny LLaVA (q/k/v and gate/up read one input each), blocks of 16 columns so every matrix has several:
    the pruned weights and masks equal those of the engine running the reference routine."""
    model, _ = build_tiny("llava", seed=0)
    batches = [build_tiny("llava", seed=s, batch=2, padded=True)[1] for s in range(2)]
    config = PruneConfig("sparsegpt", sparsity=0.5, pattern=pattern, blocksize=16)
    fast_model, reference_model, masks_model = model, copy.deepcopy(model), copy.deepcopy(model)
    fast = prune_(fast_model, config, batches, keep_masks=True, progress=False).masks
    masks_only = compute_masks(masks_model, config, batches, progress=False).masks
    with monkeypatch.context() as patch:
        patch.setitem(SCORERS, "sparsegpt", Scorer("sparsegpt", reference_sparsegpt_prune, "hessian", True))
        reference = prune_(reference_model, config, batches, keep_masks=True, progress=False).masks
    assert fast.keys() == reference.keys() and len(fast) == 2 * 7
    assert all(torch.equal(fast[k], reference[k]) for k in reference)
    assert all(torch.equal(masks_only[k], reference[k]) for k in reference)
    fast_state, reference_state = fast_model.state_dict(), reference_model.state_dict()
    assert all(torch.equal(fast_state[k], reference_state[k]) for k in reference_state)
