"""Pure math: hand-computed masks, exact sparsity, N:M groups, SparseGPT reconstruction."""

import pytest
import torch

from pruning.errors import NumericalError
from pruning.masks import (
    apply_mask_,
    lowest_mask,
    lowest_mask_by_sort,
    matrix_mask,
    nm_mask,
    nm_mask_by_sort,
    row_mask,
    sparsity_of,
    zero_where_,
)
from pruning.scores import magnitude_scores, wanda_scores
from pruning.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from pruning.stats import Hessian, SquaredNorms


def test_wanda_and_magnitude_prune_different_columns():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    sq_norms = torch.tensor([16.0, 4.0, 1.0, 0.25])  # ||X_j|| = 4, 2, 1, 0.5 -> Wanda scores 4, 4, 3, 2
    assert torch.equal(wanda_scores(w, sq_norms), torch.tensor([[4.0, 4.0, 3.0, 2.0]]))
    assert row_mask(magnitude_scores(w), 0.5).tolist() == [[True, True, False, False]]
    assert row_mask(wanda_scores(w, sq_norms), 0.5).tolist() == [[False, False, True, True]]


def test_row_mask_ties_are_stable_and_sparsity_is_exact_per_row():
    assert row_mask(torch.ones(1, 4), 0.5).tolist() == [[True, True, False, False]]
    scores = torch.rand(7, 33, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.0, 0.3, 0.5, 0.6):
        mask = row_mask(scores, sparsity)
        assert mask.sum(dim=1).tolist() == [int(33 * sparsity)] * 7
        kept_min = scores.masked_fill(mask, float("inf")).min(dim=1).values
        pruned_max = scores.masked_fill(~mask, float("-inf")).max(dim=1).values
        assert bool((pruned_max <= kept_min).all())


def test_nm_mask_by_hand_and_group_by_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    big = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for n, m in ((2, 4), (4, 8)):
        groups = nm_mask(big, n, m).reshape(16, 64 // m, m)
        assert bool((groups.sum(dim=2) == n).all())
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.ones(2, 6), 2, 4)


def _hard_scores(rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Score matrices where a selection and a stable sort could part: ties, signed zeros, infinities, NaN."""
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(rows, cols, generator=g)
    special = torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf"), 1.0, 0.0, 2.0])
    return {"random": scores, "ties": (scores * 3).round(), "constant": torch.ones(rows, cols),
            "special": special[torch.randint(0, 8, (rows, cols), generator=g)],
            "nan": scores.masked_fill(scores < 0.2, float("nan"))}


@pytest.mark.parametrize("m", [2, 4, 8, 16, 32])
def test_nm_mask_equals_the_stable_sort(m):
    for rows in (3, 5000):  # the all-pairs form for small inputs and the pairwise loop for large ones
        for name, s in _hard_scores(rows, 4 * m).items():
            for n in sorted({1, m // 2, m - 1}):
                assert torch.equal(nm_mask(s, n, m), nm_mask_by_sort(s, n, m)), (name, rows, n)


def test_lowest_mask_equals_the_stable_sort():
    for name, s in _hard_scores(9, 40).items():
        for n_prune in (0, 1, 7, 180, 359, 360):
            assert torch.equal(lowest_mask(s, n_prune), lowest_mask_by_sort(s, n_prune)), (name, n_prune)
        assert torch.equal(lowest_mask(s.T, 100), lowest_mask_by_sort(s.T, 100)), name  # non-contiguous


def test_matrix_mask_compares_across_rows():
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert matrix_mask(scores, 0.5).tolist() == [[True, True], [False, False]]


def test_apply_mask_zeroes_exactly_the_mask():
    linear = torch.nn.Linear(4, 2, bias=False)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    before = linear.weight.detach().clone()
    apply_mask_(linear, mask)
    assert torch.equal(linear.weight[mask], torch.zeros(2))
    assert torch.equal(linear.weight[~mask], before[~mask])
    assert sparsity_of(linear.weight) == 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_zero_where_is_masked_fill_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(6, 40, generator=g) * 100
    values[0, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0])
    tensor = values.to(dtype)
    mask = torch.rand(6, 40, generator=g) < 0.5
    mask[0, :5] = True
    expected = tensor.clone().masked_fill_(mask, 0)
    got = zero_where_(tensor.clone(), mask)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    assert torch.equal(got.view(width), expected.view(width))  # the sign bit of -0.0 too


def test_squared_norms_weigh_each_sample_once():
    acc = SquaredNorms(2)
    acc.add(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))  # one sample of 2 tokens
    acc.add(torch.tensor([[2.0, 2.0]]))              # one sample of 1 token
    assert torch.equal(acc.result(), torch.tensor([(1 + 9 + 4) / 2, (4 + 0 + 4) / 2]))


def test_accumulators_do_not_overflow_with_fp16_activations():
    x = torch.full((64, 3), 60000.0, dtype=torch.float16)  # x^2 overflows fp16
    norms, hessian = SquaredNorms(3), Hessian(3)
    norms.add(x)
    hessian.add(x)
    assert torch.isfinite(norms.result()).all() and torch.isfinite(hessian.result()).all()
    assert norms.result()[0].item() == pytest.approx(64 * 60000.0**2, rel=1e-6)


def test_hessian_result_is_one_tensor_until_the_next_add():
    """Linears sharing an accumulator get one Hessian tensor (SparseGPT inverts it once); an add or an in-place
    change of the handed-out mean gives a fresh one."""
    hessian = Hessian(3)
    hessian.add(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]))
    first = hessian.result()
    assert hessian.result() is first
    first.mul_(2.0)
    assert hessian.result() is not first and torch.equal(hessian.result(), hessian.total)
    kept = hessian.result()
    hessian.add(torch.tensor([[1.0, 0.0, 0.0]]))
    assert hessian.result() is not kept and torch.equal(hessian.result(), hessian.total / 2)


def test_sparsegpt_with_diagonal_hessian_is_saliency_pruning_without_updates():
    # With a diagonal Hessian the OBS update touches no other column, and the saliency is w^2 (h + damp).
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0], [4.0, 0.1, -1.0, 1.0]])
    h = torch.diag(torch.tensor([1.0, 0.01, 4.0, 1.0]))
    damp = 0.01 * h.diagonal().mean()
    saliency = w.pow(2) * (h.diagonal() + damp)
    new_w, mask = sparsegpt_prune(w, h, 0.5, blocksize=128, percdamp=0.01)
    assert torch.equal(mask, matrix_mask(saliency, 0.5))
    assert torch.allclose(new_w[~mask], w[~mask]) and bool((new_w[mask] == 0).all())


def _reconstruction_error(w, w_new, x):
    return (x @ w.T - x @ w_new.T).norm().item()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda(nm):
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(32, 32, generator=g)
    x = torch.randn(256, 32, generator=g) @ mixing  # correlated features
    w = torch.randn(16, 32, generator=g)
    norms, hessian = SquaredNorms(32), Hessian(32)
    norms.add(x)
    hessian.add(x)
    wanda_mask = (nm_mask(wanda_scores(w, norms.result()), *nm) if nm
                  else row_mask(wanda_scores(w, norms.result()), 0.5))
    w_wanda = w.masked_fill(wanda_mask, 0)
    w_sgpt, mask = sparsegpt_prune(w, hessian.result(), 0.5, nm=nm, blocksize=8)
    assert sparsity_of(w_sgpt) == pytest.approx(0.5, abs=0.02)
    if nm:
        assert bool((mask.reshape(16, 8, 4).sum(dim=2) == 2).all())
    error = _reconstruction_error(w, w_sgpt, x)
    assert error < _reconstruction_error(w, w_wanda, x)
    assert error < _reconstruction_error(w, w.masked_fill(mask, 0), x)  # the OBS update helps on its own mask


def test_sparsegpt_failed_cholesky_is_an_error():
    h = -torch.eye(4)
    with pytest.raises(NumericalError, match="percdamp"):
        inverse_hessian_factor(h, percdamp=0.01)
