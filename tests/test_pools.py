"""Calibration pools: ATV's k rule and top-k drift selection, by hand."""

import torch

from pruning.pools import (
    alpha_rule_k,
    atv_pool,
    drift,
    random_visual,
    ratio_rule_k,
    text_pool,
    top_drift_visual,
    visual_pool,
)

# One sample: positions 0-1 text, 2-7 visual, 8-9 text, 10 padding.
VISUAL = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
VALID = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
DRIFT = torch.tensor([[0.0, 0.0, 0.1, 0.9, 0.3, 0.8, 0.2, 0.5, 0.0, 0.0, 0.0]])


def test_text_and_visual_pools_exclude_padding():
    assert text_pool(VISUAL, VALID).nonzero()[:, 1].tolist() == [0, 1, 8, 9]
    assert visual_pool(VISUAL, VALID).nonzero()[:, 1].tolist() == [2, 3, 4, 5, 6, 7]
    padded_visual = VISUAL.clone()
    padded_visual[0, 10] = True  # a visual id on a padding position still never enters
    assert not visual_pool(padded_visual, VALID)[0, 10]


def test_alpha_rule_follows_the_reference_formula():
    # k = round(min(1, alpha * d) * n_text), capped at n_visual; Python's round (half to even)
    assert alpha_rule_k(n_text=10, n_visual=20, mean_drift=0.25, alpha=1.0) == 2   # round(2.5) = 2
    assert alpha_rule_k(n_text=10, n_visual=20, mean_drift=0.35, alpha=1.0) == 4   # round(3.5) = 4
    assert alpha_rule_k(n_text=10, n_visual=20, mean_drift=0.25, alpha=2.0) == 5
    assert alpha_rule_k(n_text=10, n_visual=3, mean_drift=0.9, alpha=1.0) == 3     # cap
    assert alpha_rule_k(n_text=10, n_visual=20, mean_drift=0.6, alpha=5.0) == 10   # min(1, .) = 1
    assert ratio_rule_k(n_visual=20, ratio=0.1) == 2


def test_top_k_visual_tokens_are_exactly_the_largest_drift():
    chosen = top_drift_visual(DRIFT[0], VISUAL[0] & VALID[0], 3)
    assert chosen.nonzero().squeeze(1).tolist() == [3, 5, 7]  # drifts 0.9, 0.8, 0.5


def test_atv_pool_is_text_plus_top_k():
    # 4 text tokens, mean drift 0.5, alpha 1 -> k = round(0.5 * 4) = 2
    pool, ks = atv_pool(VISUAL, VALID, DRIFT, alpha=1.0, mean_drift=0.5)
    assert ks == [2]
    assert pool[0].nonzero().squeeze(1).tolist() == [0, 1, 3, 5, 8, 9]


def test_atv_pool_with_large_alpha_takes_every_visual_token_when_text_outnumbers_them():
    visual = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)  # 5 text, 3 visual
    valid = torch.ones_like(visual)
    pool, ks = atv_pool(visual, valid, torch.rand(1, 8), alpha=1e6, mean_drift=0.01)
    assert ks == [3]
    assert torch.equal(pool, valid)


def test_fixed_ratio_rule_ignores_mean_drift():
    pool, ks = atv_pool(VISUAL, VALID, DRIFT, ratio=0.5)
    assert ks == [3]
    assert pool[0].nonzero().squeeze(1).tolist() == [0, 1, 3, 5, 7, 8, 9]


def test_random_visual_draws_k_visual_tokens_reproducibly():
    a = random_visual(VISUAL[0], 3, torch.Generator().manual_seed(4))
    b = random_visual(VISUAL[0], 3, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and int(a.sum()) == 3 and not bool((a & ~VISUAL[0]).any())


def test_drift_is_one_minus_cosine():
    x_in = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    x_out = torch.tensor([[[0.0, 2.0], [2.0, 2.0]]])
    assert torch.allclose(drift(x_in, x_out), torch.tensor([[1.0, 0.0]]), atol=1e-6)


def test_drift_of_a_token_held_as_several_streams_compares_the_whole_token():
    # one token, two residual streams (hyper-connections): in (1, 0 | 0, 1), out (3, 0 | 0, -1)
    x_in = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    x_out = torch.tensor([[3.0, 0.0], [0.0, -1.0]]).reshape(1, 1, 2, 2)
    got = drift(x_in, x_out)
    assert got.shape == (1, 1)
    # cos of the 4-vectors = (3 - 1) / (sqrt(2) * sqrt(10)); a mean of per-stream drifts would give 1.0
    assert torch.allclose(got, torch.tensor([[1.0 - 2.0 / 20 ** 0.5]]))
