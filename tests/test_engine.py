"""The layer-wise engine on tiny random models: statistics against a direct computation,
exact sparsity, schedules, propagation, padding and bad input."""

import copy

import pytest
import torch
from tiny_models import build_tiny
from torch import nn

from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks, prune_
from pruning.errors import CalibrationError, ConfigError, UnsupportedModelError
from pruning.execution import ExecutionConfig
from pruning.masks import row_mask
from pruning.pools import text_pool, visual_pool
from pruning.scores import wanda_scores


def _batches(family="llava", n=3):
    """The seed-0 model and the inputs of ``n`` seeds (different random tokens and images)."""
    model, _ = build_tiny(family, seed=0)
    return model, [build_tiny(family, seed=seed)[1] for seed in range(n)]


@pytest.fixture(scope="module")
def llava():
    model, batches = _batches("llava")
    return model, batches


def _layer0_q_inputs(model, inputs):
    """Input of layer 0's q_proj computed directly from the model's own hidden states."""
    with torch.no_grad():
        hidden = model.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[0]
        layer = get_adapter(model).decoder_layers(model)[0]
        return layer.input_layernorm(hidden)


@pytest.mark.parametrize("pool", ["all", "text", "visual"])
def test_wanda_statistics_equal_a_direct_computation(llava, pool):
    model, batches = llava
    adapter = get_adapter(model)
    total = 0
    for inputs in batches:
        x = _layer0_q_inputs(model, inputs)
        visual = adapter.visual_mask(model, inputs["input_ids"])
        valid = inputs["attention_mask"].bool()
        chosen = {"all": valid, "text": text_pool(visual, valid), "visual": visual_pool(visual, valid)}[pool]
        total = total + x[chosen].double().pow(2).sum(0)
    weight = adapter.named_linears(model, 0)["self_attn.q_proj"].weight
    expected = row_mask(wanda_scores(weight, (total / len(batches)).float()), 0.5)
    report = compute_masks(copy.deepcopy(model), PruneConfig("wanda", pool=pool, layers=(0,),
                                                             targets=("self_attn.q_proj",)), batches, progress=False)
    (mask,) = report.masks.values()
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("method, extra", [("magnitude", {}), ("wanda", {}), ("atv", {}),
                                           ("atv", {"visual_ratio": 0.25}), ("wanda", {"pool": "random-visual"})])
def test_every_row_has_exactly_the_requested_sparsity(llava, method, extra):
    model, batches = llava
    pruned = copy.deepcopy(model)
    prune_(pruned, PruneConfig(method, sparsity=0.5, **extra), batches, progress=False)
    adapter = get_adapter(pruned)
    for i in range(len(adapter.decoder_layers(pruned))):
        for name, linear in adapter.named_linears(pruned, i).items():
            zeros = (linear.weight == 0).sum(dim=1)
            assert zeros.tolist() == [linear.in_features // 2] * linear.out_features, (i, name)


def test_nm_pattern_in_every_group(llava):
    model, batches = llava
    pruned = copy.deepcopy(model)
    prune_(pruned, PruneConfig("atv", pattern="2:4"), batches, progress=False)
    for name, linear in get_adapter(pruned).named_linears(pruned, 1).items():
        groups = (linear.weight == 0).reshape(linear.out_features, -1, 4).sum(dim=2)
        assert bool((groups == 2).all()), name


@pytest.mark.parametrize("config", [PruneConfig("atv"), PruneConfig("sparsegpt", pool="atv"),
                                    PruneConfig("wanda", pool="random-visual")])
def test_two_pass_and_three_pass_give_identical_masks(llava, config):
    model, batches = llava
    two = compute_masks(copy.deepcopy(model), config, batches, execution=ExecutionConfig(schedule="two-pass"),
                        progress=False)
    three = compute_masks(copy.deepcopy(model), config, batches, execution=ExecutionConfig(schedule="three-pass"),
                          progress=False)
    assert two.masks.keys() == three.masks.keys()
    assert all(torch.equal(two.masks[k], three.masks[k]) for k in two.masks)


def test_compute_masks_leaves_weights_and_matches_prune(llava):
    model, batches = llava
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = compute_masks(model, PruneConfig("atv"), batches, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruned = copy.deepcopy(model)
    prune_(pruned, PruneConfig("atv"), batches, progress=False)
    modules = dict(pruned.named_modules())
    for name, mask in report.masks.items():
        assert torch.equal(modules[name].weight == 0, mask), name


def test_propagation_changes_later_layers_only(llava):
    model, batches = llava
    pruned = compute_masks(copy.deepcopy(model), PruneConfig("wanda", sparsity=0.6), batches, progress=False).masks
    dense = compute_masks(copy.deepcopy(model), PruneConfig("wanda", sparsity=0.6, propagate="dense"), batches,
                          progress=False).masks
    first = [k for k in pruned if ".layers.0." in k]
    later = [k for k in pruned if ".layers.1." in k]
    assert all(torch.equal(pruned[k], dense[k]) for k in first)
    assert not all(torch.equal(pruned[k], dense[k]) for k in later)


def test_layer_subset_leaves_other_layers_untouched(llava):
    model, batches = llava
    pruned = copy.deepcopy(model)
    report = prune_(pruned, PruneConfig("wanda", layers=(1,)), batches, progress=False)
    assert [layer.index for layer in report.layers] == [1]
    layer0 = get_adapter(model).decoder_layers(model)[0].state_dict()
    assert all(torch.equal(v, get_adapter(pruned).decoder_layers(pruned)[0].state_dict()[k]) for k, v in layer0.items())


def test_atv_report_counts_and_k(llava):
    model, batches = llava
    report = prune_(copy.deepcopy(model), PruneConfig("atv", visual_ratio=0.5), batches, progress=False)
    adapter = get_adapter(model)
    n_visual = [int(adapter.visual_mask(model, b["input_ids"]).sum()) for b in batches]
    for layer in report.layers:
        assert layer.k_per_sample == [round(0.5 * n) for n in n_visual]
        assert layer.visual_selected == sum(layer.k_per_sample)
        assert layer.pooled_tokens == layer.text_tokens + layer.visual_selected


def test_padding_never_enters_the_pool():
    model, inputs = build_tiny("llava", batch=2, padded=True)
    valid = int(inputs["attention_mask"].sum())
    assert valid < inputs["attention_mask"].numel()
    report = prune_(copy.deepcopy(model), PruneConfig("wanda", pool="all"), [inputs], progress=False)
    assert all(layer.pooled_tokens == valid for layer in report.layers)
    assert report.samples == 2


def test_text_only_calibration_with_a_visual_pool_is_an_error_before_work(llava):
    model, batches = llava
    text_only = {k: v for k, v in batches[0].items() if k != "pixel_values"}
    text_only["input_ids"] = text_only["input_ids"].clamp(max=model.config.image_token_id - 1)
    with pytest.raises(CalibrationError, match="needs visual tokens"):
        prune_(copy.deepcopy(model), PruneConfig("atv"), [text_only], progress=False)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        prune_(copy.deepcopy(model), PruneConfig("wanda"), [], progress=False)


def test_bad_layers_and_indivisible_pattern(llava):
    model, batches = llava
    with pytest.raises(ConfigError, match="out of range"):
        prune_(copy.deepcopy(model), PruneConfig("wanda", layers=(7,)), batches, progress=False)
    with pytest.raises(ConfigError, match="not divisible by 7"):
        prune_(copy.deepcopy(model), PruneConfig("magnitude", pattern="3:7"), progress=False)


def test_unsupported_architecture_is_a_clear_error():
    class Config:
        model_type = "made_up"

    class Odd(nn.Module):
        config = Config()

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(UnsupportedModelError, match="made_up"):
        prune_(Odd(), PruneConfig("magnitude"), progress=False)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm",
                                    "internvl", "mistral3"])
@pytest.mark.parametrize("method", ["atv", "tamp"])
def test_every_family_prunes_with_exact_row_sparsity(family, method):
    model, inputs = build_tiny(family, batch=2, padded=True)
    report = prune_(model, PruneConfig(method, sparsity=0.5), [inputs], progress=False)
    adapter = get_adapter(model)
    assert [layer.index for layer in report.layers] == list(range(len(adapter.decoder_layers(model))))
    for i in range(len(adapter.decoder_layers(model))):
        for name, linear in adapter.named_linears(model, i).items():
            zeros = (linear.weight == 0).sum(dim=1)
            assert zeros.tolist() == [linear.in_features // 2] * linear.out_features, (family, i, name)
    assert all(0 < layer.visual_selected < layer.visual_tokens for layer in report.layers if method == "tamp")
