"""TAMP's AMIA selection against a brute-force reading of its definition."""

import pytest
import torch
import torch.nn.functional as F

from pruning.errors import CalibrationError
from pruning.tamp import MMD_SCALE, amia_select, modality_density


def _mmd2(x, chosen):
    kernel = torch.exp(-torch.cdist(x, x).pow(2) / 2)
    return float(kernel.mean() + kernel[chosen][:, chosen].mean() - 2 * kernel[:, chosen].mean())


def test_selection_stops_at_the_first_prefix_under_the_mmd_threshold():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(40, 16, generator=g)
    visual = torch.arange(40) < 30
    attention = torch.softmax(torch.randn(40, generator=g), 0)
    chosen = amia_select(outputs, visual, attention)
    x = F.normalize(outputs, dim=-1)
    threshold = MMD_SCALE * (1 - modality_density(x, visual)) ** 0.5
    assert 0 < int(chosen.sum()) <= 40
    assert _mmd2(x, chosen) < threshold + 1e-6


def test_first_pick_is_the_best_graph_score():
    # Token 0 has all the attention; with no neighbour effects it must be selected.
    outputs = torch.eye(6) + 0.01
    visual = torch.tensor([True, True, True, False, False, False])
    attention = torch.tensor([1.0, 0, 0, 0, 0, 0])
    assert bool(amia_select(outputs, visual, attention)[0])


def test_density_by_hand():
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)
    visual = torch.tensor([True, True, False, False])
    # vv: 1, tt: 1, vt: 0 -> (1 + 1 + 0) / 3
    assert modality_density(x, visual) == pytest.approx(2 / 3)


def test_needs_both_modalities():
    with pytest.raises(CalibrationError, match="both text and visual"):
        amia_select(torch.randn(4, 3), torch.ones(4, dtype=torch.bool), torch.ones(4))
