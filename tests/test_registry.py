"""A new method is one registered function plus one line of the method table."""

import copy

import pytest
import torch
from tiny_models import build_tiny

from pruning import config as config_module
from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks, prune_
from pruning.errors import ConfigError
from pruning.registry import POOLS, SCORERS, get_pool, get_scorer, register_pool, register_scorer
from pruning.scores import wanda_scores


@pytest.fixture
def toy_method(monkeypatch):
    """Scorer 'largest' (-|W|: prunes the largest weights) as method 'anti-magnitude'; removed afterwards."""
    monkeypatch.setitem(config_module.METHODS, "anti-magnitude", ("largest", None))
    register_scorer("largest", needs=None)(lambda weight: -weight.abs())
    yield
    SCORERS.pop("largest")


@pytest.fixture
def first_token_pool(monkeypatch):
    """Pool 'first' (the first position of every sample) as method 'wanda-first'; removed afterwards."""
    monkeypatch.setitem(config_module.METHODS, "wanda-first", ("wanda", "first"))

    def first(visual, valid, drifts, params):
        pool = torch.zeros_like(valid)
        pool[:, 0] = True
        return pool, []
    register_pool("first")(first)
    yield
    POOLS.pop("first")


def test_registered_scorer_prunes_with_hand_computable_masks(toy_method):
    model, _ = build_tiny("llava")
    adapter = get_adapter(model)
    q = adapter.named_linears(model, 0)["self_attn.q_proj"]
    cols = q.in_features
    with torch.no_grad():
        q.weight.copy_(torch.arange(1, cols + 1, dtype=q.weight.dtype).expand_as(q.weight))  # |W| grows along a row
    report = prune_(model, PruneConfig("anti-magnitude", sparsity=0.5), keep_masks=True, progress=False)
    mask = report.masks["model.language_model.layers.0.self_attn.q_proj"]
    assert not mask[:, :cols // 2].any() and mask[:, cols // 2:].all()  # the right (largest) half goes
    assert bool((q.weight[:, cols // 2:] == 0).all()) and bool((q.weight[:, :cols // 2] != 0).all())
    for name, mask in report.masks.items():
        assert int(mask.sum(dim=1).min()) == int(mask.sum(dim=1).max()) == int(mask.shape[1] * 0.5), name


def test_registered_pool_feeds_the_statistics(first_token_pool):
    model, inputs = build_tiny("llava")
    report = compute_masks(copy.deepcopy(model), PruneConfig("wanda-first", layers=(0,)), [inputs], progress=False)
    layer = get_adapter(model).decoder_layers(model)[0]
    with torch.no_grad():
        hidden = model.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[0]
        first = layer.input_layernorm(hidden)[:, 0]  # (B, C): only position 0 feeds the norms
    q = layer.self_attn.q_proj.weight
    expected = wanda_scores(q, first.float().pow(2).sum(0) / first.shape[0])
    mask = report.masks["model.language_model.layers.0.self_attn.q_proj"]
    n_prune = int(q.shape[1] * 0.5)
    kept_min = expected.masked_fill(mask, float("inf")).min(dim=1).values
    pruned_max = expected.masked_fill(~mask, float("-inf")).max(dim=1).values
    assert bool((pruned_max <= kept_min).all()) and bool((mask.sum(dim=1) == n_prune).all())
    assert report.layers[0].pooled_tokens == inputs["input_ids"].shape[0]


@pytest.mark.parametrize("make, match", [
    (lambda: PruneConfig("obs"),
     r"unknown method 'obs'; choose one of \['atv', 'magnitude', 'sparsegpt', 'tamp', 'wanda'\]"),
    (lambda: PruneConfig("wanda", pool="images"),
     r"unknown pool 'images'; choose one of \['all', 'atv', 'random-visual', 'tamp', 'text', 'visual'\]"),
    (lambda: get_scorer("obs"), r"unknown scorer 'obs'; choose one of \['magnitude', 'sparsegpt', 'wanda'\]"),
    (lambda: get_pool("images"), r"unknown pool 'images'; choose one of \[.*'visual'\]"),
    (lambda: register_scorer("x", needs="gradients"), r"needs must be one of .* got 'gradients'"),
])
def test_unknown_names_are_config_errors_with_the_choices(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_a_method_line_naming_an_unregistered_scorer_fails(monkeypatch):
    monkeypatch.setitem(config_module.METHODS, "broken", ("nonexistent", "all"))
    with pytest.raises(ConfigError, match="unknown scorer 'nonexistent'"):
        PruneConfig("broken")


def test_builtin_flags():
    assert get_scorer("sparsegpt").updates_weights and get_scorer("magnitude").needs is None
    assert get_pool("tamp").needs_attention and get_pool("atv").needs_drift and get_pool("visual").needs_visual
    assert not get_pool("text").needs_visual
