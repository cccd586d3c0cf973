"""Mixture-of-experts feed-forwards (pruning.experts): fused 3-D experts pruned per expert and per row, with
statistics from exactly the tokens the router sent to each expert within the pool."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from recipes_moe import RECIPES
from tiny_families import IMAGE as FAMILY_IMAGE  # the recipes' vocabulary, not tiny_models'
from tiny_families import build_family
from tiny_models import IMAGE, MOE_FAMILIES, build_tiny

from mot_probe.routing import ModalityRouter, RoutedLinear
from pruning import PruneConfig, compute_masks, prune_
from pruning.adapters import DECODER_PROJ, get_adapter, tokens_align
from pruning.errors import ConfigError, UnsupportedModelError
from pruning.execution import ExecutionConfig
from pruning.experts import (
    ExpertLayout,
    block_targets,
    check_layout,
    eager_experts,
    find_experts,
    routed_forward,
    scaled_forward,
)


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family(request):
    return request.param


def _tiny(family):
    return build_tiny(family, seed=0, batch=2, padded=True)


def _moe_layers(model):
    layers = get_adapter(model).decoder_layers(model)
    return [i for i, layer in enumerate(layers) if find_experts(layer)]


def _hand_row_mask(scores, sparsity):
    """The reference definition: the int(in * sparsity) lowest of each row, stable sort."""
    n = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :n], True)
    return mask


def test_discovery_finds_fused_experts_not_routers(family):
    model, _ = _tiny(family)
    adapter = get_adapter(model)
    moe = _moe_layers(model)
    assert moe and len(moe) < len(adapter.decoder_layers(model))  # both MoE and dense blocks in the tiny model
    linears, experts = block_targets(adapter, model, moe[0], DECODER_PROJ)
    assert set(experts.modules) == {"mlp.experts"}
    assert len(experts.matrices) == 2 * 8 and "mlp.experts.down_proj[7]" in experts.matrices
    assert not any("gate." in n or n.endswith(".gate") for n in linears)  # the router is never a target
    shared = {n for n in linears if n.startswith("mlp.")}
    assert shared == ({"mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"}
                      if family == "glm4v_moe" else set())
    dense = [i for i in range(len(adapter.decoder_layers(model))) if i not in moe][0]
    linears, experts = block_targets(adapter, model, dense, DECODER_PROJ)
    assert not experts and linears == adapter.named_linears(model, dense, DECODER_PROJ)


def test_recording_forward_is_bit_identical(family):
    model, inputs = _tiny(family)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    block = layers[_moe_layers(model)[0]].mlp
    hidden = torch.randn(13, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(3))
    _, weights, index = block.gate(hidden)
    own = type(block.experts).forward.__wrapped__(block.experts, hidden, index, weights)  # transformers' eager loop
    record = {}
    assert torch.equal(routed_forward(block.experts, hidden, index, weights, record), own)
    for e, tokens in enumerate(record["tokens"]):  # each expert's tokens are the ones the router sent it
        assert torch.equal(tokens.sort().values, torch.where((index == e).any(dim=1))[0])
    with torch.no_grad(), eager_experts(model, layers):
        reference = model(**inputs).logits
        targets = [block_targets(adapter, model, i, DECODER_PROJ)[1] for i in _moe_layers(model)]
        with targets[0].recording() as records:
            recorded = model(**inputs).logits
    assert torch.equal(recorded, reference) and records["mlp.experts"]["n"] == inputs["input_ids"].numel()


@pytest.mark.parametrize("method", ["atv", "wanda", "sparsegpt"])
def test_exact_row_sparsity_in_every_expert_matrix(family, method):
    model, inputs = _tiny(family)
    report = prune_(model, PruneConfig(method, sparsity=0.5), [inputs], progress=False)
    layers = get_adapter(model).decoder_layers(model)
    checked = 0
    for i in _moe_layers(model):
        experts = layers[i].mlp.experts
        for param in (experts.gate_up_proj, experts.down_proj):
            zeros = (param == 0).sum(dim=2)  # (E, out)
            if method == "sparsegpt":  # SparseGPT chooses per column block: exact per matrix, not per row
                assert torch.equal(zeros.sum(dim=1), torch.full((param.shape[0],), param.shape[1] *
                                                                 int(param.shape[2] * 0.5)))
            else:
                assert bool((zeros == int(param.shape[2] * 0.5)).all())
            checked += param.shape[0]
        assert report.layers[i].sparsity["mlp.experts.down_proj[0]"] == 0.5
        assert sum(report.layers[i].experts["mlp.experts"]["routed_tokens"]) == \
            2 * int(inputs["attention_mask"].sum())  # top-2: every valid token twice
    assert checked == 2 * 8 * len(_moe_layers(model))


def test_nm_pattern_in_expert_matrices():
    model, inputs = _tiny("qwen3_vl_moe")
    prune_(model, PruneConfig("wanda", pattern="2:4"), [inputs], progress=False)
    down = get_adapter(model).decoder_layers(model)[0].mlp.experts.down_proj
    groups = (down == 0).reshape(down.shape[0], down.shape[1], -1, 4).sum(dim=-1)
    assert bool((groups == 2).all())


def test_hand_computed_wanda_masks_from_routed_pooled_tokens():
    """Layer 0 of qwen3_vl_moe, text pool: route the tokens ourselves, Wanda norms over each expert's
    text tokens, row masks by a stable sort; the engine's masks must be equal."""
    model, inputs = _tiny("qwen3_vl_moe")
    layer = get_adapter(model).decoder_layers(model)[0]
    seen = {}
    handle = layer.mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad(), eager_experts(model, get_adapter(model).decoder_layers(model)):
        model(**inputs)
    handle.remove()
    x = seen["x"]  # (B, T, H) the MoE block's input
    batch, hidden = x.shape[0], x.shape[-1]
    flat = x.reshape(-1, hidden)
    with torch.no_grad():
        _, _, index = layer.mlp.gate(flat)  # (B*T, k)
    ids = inputs["input_ids"].reshape(-1)
    text = (inputs["attention_mask"].reshape(-1) == 1) & (ids != IMAGE)
    experts = layer.mlp.experts
    report = compute_masks(model, PruneConfig("wanda", pool="text", sparsity=0.5, layers=(0,)), [inputs],
                           progress=False)
    prefix = "model.language_model.layers.0.mlp.experts"
    differs_from_magnitude = 0
    for e in range(experts.gate_up_proj.shape[0]):
        routed = (index == e).any(dim=1) & text
        rows = flat[routed].float()
        assert report.layers[0].experts["mlp.experts"]["pooled_tokens"][e] == int(routed.sum())
        with torch.no_grad():
            gate, up = F.linear(flat[routed], experts.gate_up_proj[e]).chunk(2, dim=-1)
            inner = (F.silu(gate) * up).float()
        for name, inputs_e in (("gate_up_proj", rows), ("down_proj", inner)):
            weight = getattr(experts, name)[e].detach().float()
            norms = inputs_e.pow(2).sum(dim=0) / batch
            expected = _hand_row_mask(weight.abs() * norms.sqrt(), 0.5)
            assert torch.equal(report.masks[f"{prefix}.{name}[{e}]"], expected), (name, e)
            differs_from_magnitude += not torch.equal(expected, _hand_row_mask(weight.abs(), 0.5))
    assert differs_from_magnitude > 0  # the check tells Wanda from magnitude
    assert torch.count_nonzero(experts.down_proj) == experts.down_proj.numel()  # compute_masks leaves weights alone


def test_unrouted_expert_gets_the_magnitude_mask():
    model, inputs = _tiny("glm4v_moe")
    layers = get_adapter(model).decoder_layers(model)
    for i in _moe_layers(model):
        layers[i].mlp.gate.e_score_correction_bias[7] = -1e4  # the router never picks expert 7
    report = compute_masks(model, PruneConfig("atv", sparsity=0.5), [inputs], progress=False)
    for i in _moe_layers(model):
        stats = report.layers[i].experts["mlp.experts"]
        assert 7 in stats["unrouted"] and stats["pooled_tokens"][7] == 0 and stats["routed_tokens"][7] == 0
        assert all(stats["pooled_tokens"][e] > 0 for e in range(8) if e not in stats["unrouted"])
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layers[i].mlp.experts, name)[7].detach().float()
            mask = report.masks[f"model.language_model.layers.{i}.mlp.experts.{name}[7]"]
            assert torch.equal(mask, _hand_row_mask(weight.abs(), 0.5))


def test_save_and_reload_keep_the_zeros(tmp_path):
    import transformers as tf

    model, inputs = _tiny("qwen3_vl_moe")
    prune_(model, PruneConfig("atv", sparsity=0.5), [inputs], progress=False)
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    before, after = model.state_dict(), again.state_dict()
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert after[name].shape == before[name].shape and torch.equal(after[name] == 0, before[name] == 0)
    assert float((after[name] == 0).float().mean()) == 0.5
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


def test_attention_pools_refused_with_experts():
    model, inputs = _tiny("glm4v_moe")
    with pytest.raises(ConfigError, match="fused experts"):
        prune_(model, PruneConfig("tamp"), [inputs], progress=False)


def test_other_expert_layouts_refused():
    model, _ = _tiny("qwen3_vl_moe")
    experts = get_adapter(model).decoder_layers(model)[0].mlp.experts
    experts.is_transposed = True
    with pytest.raises(UnsupportedModelError, match="layout"):
        check_layout("mlp.experts", experts)


@pytest.mark.parametrize("execution", [ExecutionConfig(offload=True), ExecutionConfig(schedule="three-pass")],
                         ids=["offload", "three-pass"])
def test_offload_and_schedules_give_the_same_expert_masks(execution):
    model, inputs = _tiny("glm4v_moe")
    plain, other = copy.deepcopy(model), copy.deepcopy(model)
    reference = prune_(plain, PruneConfig("atv"), [inputs], keep_masks=True, progress=False)
    report = prune_(other, PruneConfig("atv"), [inputs], execution=execution, keep_masks=True, progress=False)
    assert report.masks.keys() == reference.masks.keys()
    assert any("experts.down_proj[" in k for k in reference.masks)
    assert all(torch.equal(report.masks[k], reference.masks[k]) for k in reference.masks)
    assert [r.experts for r in report.layers] == [r.experts for r in reference.layers]
    expected = dict(plain.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in other.named_parameters())  # pruned weights written back


def test_an_experts_forward_that_is_not_the_eager_loop_is_refused():
    model, inputs = _tiny("qwen3_vl_moe")
    experts = get_adapter(model).decoder_layers(model)[0].mlp.experts
    base = type(experts)
    experts.__class__ = type("Doubled", (base,), {"forward": lambda self, h, i, w: 2 * base.forward(self, h, i, w)})
    with pytest.raises(UnsupportedModelError, match="does not compute transformers' eager routing loop"):
        compute_masks(model, PruneConfig("wanda"), [inputs], progress=False)


def test_bf16_experts_record_exactly_and_prune_per_row():
    model, inputs = build_tiny("qwen3_vl_moe", batch=2, padded=True, dtype=torch.bfloat16)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    with torch.no_grad(), eager_experts(model, layers):
        reference = model(**inputs).logits
        with block_targets(adapter, model, 0, DECODER_PROJ)[1].recording():
            assert torch.equal(model(**inputs).logits, reference)
    prune_(model, PruneConfig("atv"), [inputs], progress=False)
    gate_up = layers[0].mlp.experts.gate_up_proj
    assert gate_up.dtype == torch.bfloat16 and bool(((gate_up == 0).sum(dim=2) == gate_up.shape[2] // 2).all())


# -- the families of tests/recipes_moe.py: other layouts and calls of fused experts ---------------------------
@functools.lru_cache(maxsize=None)
def _family(name):
    return build_family(name)


def _fresh_family(name):
    model, inputs = _family(name)
    return copy.deepcopy(model), inputs


def _mlp_input(model, layer, inputs):
    """(B, T, H) what the MoE block of ``layer`` reads in the model's own forward."""
    seen = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad(), eager_experts(model, get_adapter(model).decoder_layers(model)):
            model(**inputs)
    finally:
        handle.remove()
    return seen["x"]


def _hand_wanda(weight, rows, samples):
    """Wanda's row mask at 50% of an (out, in) weight from the (n, in) rows it read over ``samples`` samples."""
    norms = rows.float().pow(2).sum(dim=0) / samples
    return _hand_row_mask(weight.detach().float().abs() * norms.sqrt(), 0.5)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_family_prunes_each_expert_row_and_counts_its_tokens(name):
    model, inputs = _fresh_family(name)
    text = model.config.get_text_config()
    top_k = getattr(text, "num_experts_per_tok", None) or text.moe_topk  # Aria names it moe_topk
    report = prune_(model, PruneConfig("wanda", sparsity=0.5), [inputs], progress=False)
    layers = get_adapter(model).decoder_layers(model)
    moe = [i for i, layer in enumerate(layers) if find_experts(layer)]
    assert moe, f"{name}: no decoder layer holds fused experts"
    for i in moe:
        for module_name, experts in find_experts(layers[i]).items():
            layout = check_layout(module_name, experts)
            for param in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, param)
                weight = weight.transpose(1, 2) if layout.transposed else weight  # (E, out, in)
                assert bool(((weight == 0).sum(dim=2) == weight.shape[2] // 2).all()), (name, i, param)
            counts = report.layers[i].experts[module_name]
            assert sum(counts["routed_tokens"]) == top_k * int(inputs["attention_mask"].sum())
            assert counts["pooled_tokens"] == counts["routed_tokens"]  # Wanda's pool: every valid token


def test_transposed_experts_record_bit_identically_and_get_hand_computed_masks():
    """Aria stores its experts transposed (E, H, 2I) / (E, I, H) and applies them as tokens @ param[e]:
    route the tokens ourselves, Wanda norms over each expert's visual tokens, masks of the (out, in) matrices."""
    model, inputs = _fresh_family("aria")
    layer = get_adapter(model).decoder_layers(model)[0]
    experts = layer.mlp.experts
    assert check_layout("mlp.experts", experts).transposed
    flat = _mlp_input(model, layer.mlp, inputs).reshape(-1, experts.gate_up_proj.shape[1])  # (B*T, H)
    with torch.no_grad(), eager_experts(model, get_adapter(model).decoder_layers(model)):
        _, weights, index = layer.mlp.router(flat)
        own = type(experts).forward(experts, flat, index, weights)
        record = {}
        assert torch.equal(routed_forward(experts, flat, index, weights, record), own)
    visual = (inputs["input_ids"] == FAMILY_IMAGE).reshape(-1) & inputs["attention_mask"].reshape(-1).bool()
    report = compute_masks(model, PruneConfig("wanda", pool="visual", sparsity=0.5, layers=(0,)), [inputs],
                           progress=False)
    for e in range(experts.gate_up_proj.shape[0]):
        routed = (index == e).any(dim=1)
        assert torch.equal(record["tokens"][e].sort().values, torch.where(routed)[0])
        rows = flat[routed & visual]
        assert report.layers[0].experts["mlp.experts"]["pooled_tokens"][e] == rows.shape[0]
        with torch.no_grad():
            gate, up = (rows @ experts.gate_up_proj[e]).chunk(2, dim=-1)
            inner = F.silu(gate) * up
        for param, read in (("gate_up_proj", rows), ("down_proj", inner)):
            expected = _hand_wanda(getattr(experts, param)[e].T, read, samples=2)
            assert torch.equal(report.masks[f"model.language_model.layers.0.mlp.experts.{param}[{e}]"], expected)


def test_router_scaled_experts_record_bit_identically_and_get_hand_computed_masks():
    """Llama4's experts read every token once per expert, multiplied by the router's sigmoid score (0 for the
    experts it did not choose), and store their weights transposed: the statistics of expert e come from the
    scaled rows of its chosen tokens, what its matrices really read."""
    model, inputs = _fresh_family("llama4_text")
    layers = get_adapter(model).decoder_layers(model)
    moe = layers[1].feed_forward
    experts = moe.experts
    layout = check_layout("feed_forward.experts", experts)
    assert layout.transposed and not layout.routing_args
    flat = _mlp_input(model, moe, inputs).reshape(-1, experts.hidden_size)  # (N, H)
    n_experts, top_k = experts.num_experts, moe.top_k
    with torch.no_grad():
        logits = moe.router(flat)[1]  # (N, E)
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(top_k, dim=1).indices, True)
        scores = torch.where(chosen, torch.sigmoid(logits), torch.zeros_like(logits))
        scaled = (flat.repeat(n_experts, 1) * scores.T.reshape(-1, 1))  # (E*N, H), as the block builds it
        record = {}
        assert torch.equal(scaled_forward(experts, scaled, record), type(experts).forward(experts, scaled))
    report = compute_masks(model, PruneConfig("wanda", sparsity=0.5, layers=(1,)), [inputs], progress=False)
    valid = inputs["attention_mask"].reshape(-1).bool()
    counts = next(r for r in report.layers if r.index == 1).experts["feed_forward.experts"]
    for e in range(n_experts):
        assert torch.equal(record["tokens"][e], torch.where(chosen[:, e])[0])  # the router's choice, by hand
        rows = flat[chosen[:, e] & valid] * scores[chosen[:, e] & valid, e, None]
        assert counts["pooled_tokens"][e] == rows.shape[0]
        with torch.no_grad():
            gate, up = (rows @ experts.gate_up_proj[e]).chunk(2, dim=-1)
            inner = up * F.silu(gate)
        for param, read in (("gate_up_proj", rows), ("down_proj", inner)):
            expected = _hand_wanda(getattr(experts, param)[e].T, read, samples=2)
            assert torch.equal(report.masks[f"model.layers.1.feed_forward.experts.{param}[{e}]"], expected), (param, e)


def test_post_expert_norm_is_part_of_the_recorded_loop():
    model, inputs = _fresh_family("muse_spark")
    layer = get_adapter(model).decoder_layers(model)[1]
    experts = layer.mlp.experts
    assert check_layout("mlp.experts", experts).post_norm
    with torch.no_grad(), eager_experts(model, get_adapter(model).decoder_layers(model)):
        experts.post_expert_norm.weight.normal_()  # zero at init: make the norm's scale matter
        hidden = torch.randn(9, experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(5))
        tokens = torch.randn(9, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(6))
        _, weights, index = layer.mlp.gate(tokens)
        own = type(experts).forward(experts, hidden, index, weights)
        assert torch.equal(routed_forward(experts, hidden, index, weights, {}), own)
        without = ExpertLayout(post_norm=False)
        assert not torch.equal(routed_forward(experts, hidden, index, weights, {}, without), own)


def test_layouts_the_loops_do_not_serve_are_refused_by_name():
    model, _ = _fresh_family("aria")
    experts = get_adapter(model).decoder_layers(model)[0].mlp.experts
    experts.has_bias = True
    with pytest.raises(UnsupportedModelError, match=r"mlp.experts \(AriaExperts.*'has_bias': True"):
        check_layout("mlp.experts", experts)
    experts.has_bias, experts.is_transposed = False, False  # the flag contradicts the (E, H, 2I) shapes
    with pytest.raises(UnsupportedModelError, match="not a layout this toolkit prunes"):
        check_layout("mlp.experts", experts)


def test_flattened_token_inputs_line_up_with_the_token_mask():
    assert tokens_align(torch.Size([2, 15]), torch.Size([30]))  # shared experts read hidden.view(-1, C)
    assert tokens_align(torch.Size([2, 15]), torch.Size([2, 1, 15]))
    assert not tokens_align(torch.Size([2, 15]), torch.Size([29]))
    assert not tokens_align(torch.Size([2, 15]), torch.Size([15, 2]))
    router = ModalityRouter()
    linear = RoutedLinear(torch.nn.Linear(4, 3), router)
    with torch.no_grad():
        linear.materialise_("visual").weight.zero_()
        linear.path("visual").bias.zero_()
    router.visual = torch.tensor([[False, True, False], [True, False, False]])
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))  # the 2x3 tokens, flattened
    with torch.no_grad():
        out = linear(x)
        assert torch.equal(out[[1, 3]], torch.zeros(2, 3))  # visual tokens: the zeroed visual copy
        assert torch.equal(out[[0, 2, 4, 5]], linear.base_layer(x[[0, 2, 4, 5]]))  # text tokens: the dense base
