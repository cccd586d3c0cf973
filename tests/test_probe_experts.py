"""The MoT probe on mixture-of-experts models: fused experts routed per modality (RoutedExperts, the router
shared), exact before pruning, a path's experts pruned per expert and per row from the pooled tokens the
router sent to each expert, reset/unload back to the original modules, and clear refusals."""

from __future__ import annotations

import copy

import pytest
import tiny_kit
import tiny_models
import torch
from family_checks import check_generation_with_probe
from tiny_families import build_family
from tiny_models import MOE_FAMILIES, build_tiny
from torch import nn

from mot_probe import RoutedLinear, attach_probe_
from mot_probe.experts import RoutedExperts, RoutedScaledExperts
from mot_probe.routing import ModalityRouter, RoutingError
from mot_probe.surgery import ProbeError, unroutable_experts
from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.errors import UnsupportedModelError
from pruning.experts import eager_experts, find_experts, routed_forward, scaled_forward

SPARSITY = 0.5


def _moe(family):
    """(model, inputs, image token id): the tiny_families recipe for qwen3_vl_moe (every layer MoE, 4 experts),
    tiny_models for glm4v_moe (a dense layer 0, then MoE layers with 8 experts and shared experts), llama4_text
    with visual positions (see :func:`_llama4`)."""
    if family == "llama4_text":
        return _llama4()
    if family == "qwen3_vl_moe":
        return (*build_family(family), tiny_kit.IMAGE)
    return (*build_tiny(family, batch=2, padded=True), tiny_models.IMAGE)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _layers(model):
    return get_adapter(model).decoder_layers(model)


def _hand_row_mask(scores, sparsity):
    """The reference definition: the int(in * sparsity) lowest of each row, stable sort."""
    n = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :n], True)
    return mask


def _mlp_input(model, inputs, index):
    """The (B, T, H) input of decoder layer ``index``'s MoE block in the model's own forward (eager experts)."""
    seen = {}
    mlp = _layers(model)[index].mlp
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad(), eager_experts(model, _layers(model)):
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["x"]


def _hand_visual_masks(model, inputs, image, index, experts):
    """Wanda masks of every expert matrix of layer ``index`` from the visual tokens the router sent to each
    expert (magnitude where it got none), computed here from the block's input: (masks, tokens per expert)."""
    x = _mlp_input(model, inputs, index)
    batch, flat = x.shape[0], x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        chosen = _layers(model)[index].mlp.gate(flat)[2]  # (B*T, k) the router's experts per token
    visual = (inputs["input_ids"].reshape(-1) == image) & (inputs["attention_mask"].reshape(-1) == 1)
    base = experts.base_layer  # the dense weights (the text path still serves them)
    masks, counts = {}, []
    for e in range(base.gate_up_proj.shape[0]):
        routed = (chosen == e).any(dim=1) & visual
        counts.append(int(routed.sum()))
        with torch.no_grad():
            gate, up = nn.functional.linear(flat[routed], base.gate_up_proj[e]).chunk(2, dim=-1)
            inner = base.act_fn(gate) * up
        for name, rows in (("gate_up_proj", flat[routed]), ("down_proj", inner)):
            weight = getattr(base, name)[e].detach().float()
            norms = rows.float().pow(2).sum(dim=0) / batch
            scores = weight.abs() * norms.sqrt() if counts[-1] else weight.abs()
            masks[f"{name}[{e}]"] = _hand_row_mask(scores, SPARSITY)
    return masks, counts


# -- exactness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_attached_probe_routes_the_experts_and_computes_exactly_the_original(family):
    model, inputs, _ = _moe(family)
    original = copy.deepcopy(model)
    routers = {i: type(layer.mlp.gate) for i, layer in enumerate(_layers(model)) if find_experts(layer)}
    probe = attach_probe_(model)
    layers = _layers(model)
    assert {i for i, layer in enumerate(probe.experts) if layer} == set(routers)
    assert all(isinstance(layers[i].mlp.experts, RoutedExperts) for i in routers)
    assert {i: type(layers[i].mlp.gate) for i in routers} == routers  # the router is shared, not routed
    assert probe.extra_parameters() == 0
    assert torch.equal(_logits(model, inputs), _logits(original, inputs))


def test_unpruned_moe_probe_generates_exactly_the_original():
    check_generation_with_probe(*build_tiny("qwen3_vl_moe", batch=1))


def test_materialised_but_unpruned_expert_copies_still_compute_the_original():
    model, inputs, _ = _moe("glm4v_moe")
    original = copy.deepcopy(model)
    probe = attach_probe_(model)
    for routed in probe.routed_modules():
        routed.materialise_("text"), routed.materialise_("visual")
    with eager_experts(model, _layers(model)), eager_experts(original, _layers(original)):
        assert torch.allclose(_logits(model, inputs), _logits(original, inputs), atol=1e-5)


# -- the routed module on its own -------------------------------------------------------------------
def _experts_and_call(tokens=10):
    model, _ = build_tiny("qwen3_vl_moe")
    block = _layers(model)[0].mlp
    hidden = torch.randn(tokens, block.experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, weights, index = block.gate(hidden)
    return block.experts, hidden, index, weights


def test_routed_experts_send_each_token_through_its_own_copy():
    experts, hidden, index, weights = _experts_and_call()
    router = ModalityRouter()
    routed = RoutedExperts(experts, router)
    with torch.no_grad():
        routed.materialise_("visual").down_proj.mul_(-2)  # the visual copy now differs
    visual = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    flat = visual.reshape(-1)
    with torch.no_grad(), router.route(visual):
        out = routed(hidden, index, weights)
        want_visual = routed.paths["visual"](hidden[flat], index[flat], weights[flat])
        want_text = experts(hidden[~flat], index[~flat], weights[~flat])
    assert torch.equal(out[flat], want_visual) and torch.equal(out[~flat], want_text)
    assert not torch.allclose(want_visual, experts(hidden[flat], index[flat], weights[flat]))
    with pytest.raises(RoutingError, match="mask of 10 tokens"):
        routed(hidden, index, weights)  # no mask outside a routed forward


def test_recorded_routing_is_the_unsplit_loops_record():
    experts, hidden, index, weights = _experts_and_call(tokens=12)
    router = ModalityRouter()
    routed = RoutedExperts(experts, router)
    routed.materialise_("text"), routed.materialise_("visual")  # both paths split, weights still equal
    visual = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    want, got = {}, {}
    with torch.no_grad(), router.route(visual):
        out = routed.record_routing(hidden, index, weights, got)
        reference = routed_forward(experts, hidden, index, weights, want)
    assert got["n"] == want["n"] == 12 and got["hidden"] is hidden
    assert all(torch.equal(a, b) for a, b in zip(got["tokens"], want["tokens"]))  # same tokens, same order
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got["inner"], want["inner"]))
    assert torch.allclose(out, reference, atol=1e-6)
    assert sum(len(t) for t in got["tokens"]) == 12 * index.shape[1]


# -- pruning a path -----------------------------------------------------------------------------------
def test_pruning_the_visual_path_prunes_its_experts_from_routed_visual_tokens():
    """qwen3_vl_moe (tiny recipe, both layers MoE): the text path (experts included) stays bitwise dense, every
    visual expert row holds exactly int(cols * s) zeros, and the masks equal a hand computation from the
    visual tokens the router sent to each expert, layer by layer."""
    model, inputs, image = _moe("qwen3_vl_moe")
    probe = attach_probe_(model)
    text_before = [p.clone() for p in probe.path_parameters("text")]
    report = probe.prune_path_("visual", PruneConfig("wanda", sparsity=SPARSITY, pool="visual"), [inputs],
                               progress=False, keep_masks=True)
    assert all(torch.equal(a, b) for a, b in zip(text_before, probe.path_parameters("text")))
    visual = [probe.experts[i]["mlp.experts"].path("visual") for i in range(len(probe.experts))]
    for experts in visual:
        for param in (experts.gate_up_proj, experts.down_proj):  # (E, out, in)
            assert bool(((param == 0).sum(dim=2) == int(param.shape[2] * SPARSITY)).all())
    differs_from_magnitude = 0
    for i in reversed(range(len(visual))):  # layer i's statistics came from its dense pass: undo layers >= i
        for routed in (*probe.routed[i].values(), *probe.experts[i].values()):
            routed.reset_("visual")
        expected, counts = _hand_visual_masks(model, inputs, image, i, probe.experts[i]["mlp.experts"])
        stats = report.layers[i].experts["mlp.experts"]
        assert stats["pooled_tokens"] == counts and stats["unrouted"] == [e for e, n in enumerate(counts) if n == 0]
        for key, mask in expected.items():
            got = next(m for k, m in report.masks.items() if k.endswith(f"layers.{i}.mlp.experts.{key}"))
            assert torch.equal(got, mask), (i, key)
            name, _, e = key[:-1].partition("[")
            e = int(e)
            differs_from_magnitude += not torch.equal(mask, _hand_row_mask(
                getattr(probe.experts[i]["mlp.experts"].base_layer, name)[e].detach().float().abs(), SPARSITY))
            assert torch.equal(getattr(visual[i], name)[e] == 0, mask)  # the mask is what was applied
    assert differs_from_magnitude > 0  # the check tells Wanda from magnitude


def test_experts_that_saw_no_pooled_token_get_the_magnitude_mask():
    model, inputs, image = _moe("glm4v_moe")
    moe = [i for i, layer in enumerate(_layers(model)) if find_experts(layer)]
    for i in moe:
        _layers(model)[i].mlp.gate.e_score_correction_bias[7] = -1e4  # the router never picks expert 7
    probe = attach_probe_(model)
    report = probe.prune_path_("visual", PruneConfig("wanda", sparsity=SPARSITY, pool="visual", layers=(moe[0],)),
                               [inputs], progress=False, keep_masks=True)
    stats = report.layers[0].experts["mlp.experts"]
    assert 7 in stats["unrouted"] and stats["pooled_tokens"][7] == 0
    experts = probe.experts[moe[0]]["mlp.experts"]
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts.base_layer, name)[7].detach().float()
        mask = report.masks[f"model.language_model.layers.{moe[0]}.mlp.experts.{name}[7]"]
        assert torch.equal(mask, _hand_row_mask(weight.abs(), SPARSITY))
        assert torch.equal(getattr(experts.path("visual"), name)[7] == 0, mask)
    assert not probe.experts[moe[1]]["mlp.experts"].paths  # a layer left out keeps no copy


def test_pruning_the_visual_path_changes_nothing_for_text_tokens_that_see_no_image():
    model, inputs, image = _moe("glm4v_moe")
    original = copy.deepcopy(model)
    probe = attach_probe_(model)
    probe.prune_path_("visual", PruneConfig("wanda", sparsity=0.6, pool="all"), [inputs], progress=False)
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == image, 7)
    text = {"input_ids": ids, "attention_mask": inputs["attention_mask"]}
    assert torch.equal(_logits(model, text), _logits(original, text))
    got, want = _logits(model, inputs), _logits(original, inputs)
    first = int((inputs["input_ids"][0] == image).nonzero()[0])  # causal: tokens before the image never see it
    assert first > 0 and torch.allclose(got[:, :first], want[:, :first], atol=1e-5, rtol=0)
    assert (got[:, first:] - want[:, first:]).abs().max() > 1e-2
    probe.reset_("visual")
    assert torch.equal(_logits(model, inputs), _logits(original, inputs))


def test_sparsegpt_prunes_a_paths_expert_copies_per_matrix():
    model, inputs, _ = _moe("qwen3_vl_moe")
    probe = attach_probe_(model)
    probe.prune_path_("text", PruneConfig("sparsegpt", sparsity=SPARSITY, pool="text"), [inputs], progress=False)
    for routed in probe.routed_experts():
        assert not routed.path("visual").gate_up_proj.eq(0).any()  # the visual path is the dense base
        for param in (routed.path("text").gate_up_proj, routed.path("text").down_proj):
            zeros = (param == 0).sum(dim=(1, 2))  # SparseGPT: exact per matrix, not per row
            assert zeros.tolist() == [param.shape[1] * int(param.shape[2] * SPARSITY)] * param.shape[0]


# -- undo ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["glm4v_moe", "llama4_text"])
@pytest.mark.parametrize("keep", ["text", "visual"])
def test_unload_puts_back_the_original_modules_with_the_kept_paths_weights(keep, family):
    model, inputs, _ = _moe(family)
    keys = list(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    probe = attach_probe_(model)
    probe.prune_path_(keep, PruneConfig("magnitude", sparsity=SPARSITY), progress=False)
    kept = {f"{i}.{name}": (routed.path(keep).gate_up_proj.clone(), routed.path(keep).down_proj.clone())
            for i, layer in enumerate(probe.experts) for name, routed in layer.items()}
    probe.unload(keep=keep)
    assert list(model.state_dict()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(isinstance(m, (RoutedLinear, RoutedExperts)) for m in model.modules())
    for key, (gate_up, down) in kept.items():
        index, _, name = key.partition(".")
        experts = _layers(model)[int(index)].get_submodule(name)
        assert torch.equal(experts.gate_up_proj, gate_up) and torch.equal(experts.down_proj, down)
        assert float((experts.down_proj == 0).float().mean()) == SPARSITY


# -- opting out and refusals ----------------------------------------------------------------------------
def test_allow_shared_experts_keeps_them_shared_and_unpruned():
    model, inputs, _ = _moe("qwen3_vl_moe")
    before = {n: p.clone() for n, p in model.named_parameters() if "experts" in n}
    probe = attach_probe_(model, allow_shared_experts=True)
    assert not any(isinstance(m, RoutedExperts) for m in model.modules()) and not list(probe.routed_experts())
    report = probe.prune_path_("visual", PruneConfig("wanda", sparsity=SPARSITY, pool="all"), [inputs],
                               progress=False)
    assert not any("experts" in name for layer in report.layers for name in layer.sparsity)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_an_expert_layout_that_cannot_be_routed_is_refused_by_layer_module_and_layout():
    model, _, _ = _moe("qwen3_vl_moe")
    _layers(model)[1].mlp.experts.is_transposed = True
    assert list(unroutable_experts(model)) == ["1.mlp.experts"]
    with pytest.raises(ProbeError, match=r"'mlp.experts' of decoder layer 1.*is_transposed': True"):
        attach_probe_(model)
    assert not hasattr(model, "_atv_adapter") and not any(isinstance(m, RoutedLinear) for m in model.modules())


def test_experts_called_another_way_are_refused():
    model, _, _ = _moe("qwen3_vl_moe")
    experts = _layers(model)[0].mlp.experts
    forward = lambda self, hidden_states, top_k_index: hidden_states  # noqa: E731 neither call the probe routes
    experts.__class__ = type("PreRouted", (type(experts),), {"forward": forward})
    with pytest.raises(ProbeError, match=r"decoder layer 0.*PreRouted.*forward with 2 arguments"):
        attach_probe_(model)
    attach_probe_(model, allow_shared_experts=True).unload()  # the opt-out still attaches


def test_a_one_argument_forward_that_is_not_the_scaled_loop_is_refused_when_recorded():
    """A forward taking one tensor is routed as router-scaled rows; the engine's bitwise check of its recorded loop
    against the module's own forward refuses one that computes something else, and the path is reset."""
    model, inputs, _ = _llama4()
    experts = _layers(model)[1].feed_forward.experts
    experts.__class__ = type("Identity", (type(experts),), {"forward": lambda self, hidden_states: hidden_states})
    probe = attach_probe_(model)
    assert isinstance(_layers(model)[1].feed_forward.experts, RoutedScaledExperts)
    with pytest.raises(UnsupportedModelError, match=r"feed_forward.experts \(RoutedScaledExperts.*eager routing"):
        probe.prune_path_("visual", PruneConfig("wanda", sparsity=SPARSITY), [inputs], progress=False)
    assert probe.extra_parameters() == 0  # nothing half-pruned stays behind


# -- router-scaled experts (Llama4) ---------------------------------------------------------------------
def _llama4():
    """(model, inputs, visual id): llama4_text's tiny recipe with positions 1..6 of each row marked visual.

    Llama4's text model is text-only, so visual tokens are made by the adapter's own rule: the config names a
    placeholder id (``image_token_id``, which Llama4's text model never reads, so its forward is unchanged) and
    those positions of input_ids hold it. The probe routes them through the visual path and the engine's
    visual pool selects them, exactly as on an LVLM whose projector wrote image features there."""
    model, inputs = build_family("llama4_text")
    model.config.image_token_id = tiny_kit.IMAGE
    ids = inputs["input_ids"].clone()
    ids[:, 1:7] = tiny_kit.IMAGE
    return model, {**inputs, "input_ids": ids}, tiny_kit.IMAGE


def _llama4_experts_and_call(tokens=10):
    """Llama4's experts of layer 1 and an (E * N, H) router-scaled call built as its MoE block builds it."""
    model, _, _ = _llama4()
    moe = _layers(model)[1].feed_forward
    hidden = torch.randn(tokens, moe.hidden_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores = moe.router(hidden)[0]  # (N, E), 0 for the experts not chosen
        scaled = hidden.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
    return moe.experts, scaled


def test_routed_scaled_experts_send_each_tokens_rows_through_its_own_copy():
    experts, scaled = _llama4_experts_and_call()
    router = ModalityRouter()
    routed = RoutedScaledExperts(experts, router)
    with torch.no_grad():
        routed.materialise_("visual").down_proj.mul_(-2)  # the visual copy now differs
    visual = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    rows = visual.reshape(-1).repeat(experts.num_experts)  # row e * N + n belongs to token n
    width = scaled.shape[1]
    with torch.no_grad(), router.route(visual):
        out = routed(scaled)
        want_visual = routed.paths["visual"](scaled[rows]).view(-1, width)
        want_text = experts(scaled[~rows])
    assert torch.equal(out[rows], want_visual) and torch.equal(out[~rows], want_text)
    assert not torch.allclose(want_visual, experts(scaled[rows]))
    with pytest.raises(RoutingError, match="mask of 10 tokens"):
        routed(scaled)  # no mask outside a routed forward
    with torch.no_grad(), router.route(visual), pytest.raises(RoutingError, match=r"E = 4, got \(39, 64\)"):
        routed(scaled[:-1])


def test_recorded_scaled_routing_is_the_unsplit_calls_record():
    experts, scaled = _llama4_experts_and_call(tokens=12)
    router = ModalityRouter()
    routed = RoutedScaledExperts(experts, router)
    routed.materialise_("text"), routed.materialise_("visual")  # both paths split, weights still equal
    visual = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    want, got = {}, {}
    with torch.no_grad(), router.route(visual):
        out = routed.record_routing(scaled, got)
        assert torch.equal(out, routed(scaled))  # what the engine's check compares
        reference = scaled_forward(experts, scaled, want)
    assert got["n"] == want["n"] == 12
    assert all(torch.equal(a, b) for a, b in zip(got["tokens"], want["tokens"]))  # same tokens, same order
    assert all(torch.equal(a, b) for a, b in zip(got["outer"], want["outer"]))  # the scaled rows themselves
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got["inner"], want["inner"]))
    assert torch.allclose(out, reference, atol=1e-6)


def test_llama4_probe_routes_its_scaled_experts_and_computes_exactly_the_original():
    model, inputs, _ = _llama4()
    original = copy.deepcopy(model)
    probe = attach_probe_(model)
    assert [list(layer) for layer in probe.experts] == [[], ["feed_forward.experts"]]
    assert isinstance(_layers(model)[1].feed_forward.experts, RoutedScaledExperts)
    assert torch.equal(_logits(model, inputs), _logits(original, inputs))


def _llama4_hand_visual_masks(model, inputs, image, routed):
    """Wanda masks of layer 1's expert matrices from the visual tokens the router sent to each expert, scaled by
    its score (the rows those matrices read), magnitude where an expert got none: (masks, tokens per expert)."""
    moe = _layers(model)[1].feed_forward
    x = _mlp_input_of(model, moe, inputs)
    batch, flat = x.shape[0], x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        logits = moe.router(flat)[1]  # (N, E)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(moe.top_k, dim=1).indices, True)
    visual = (inputs["input_ids"].reshape(-1) == image) & (inputs["attention_mask"].reshape(-1) == 1)
    base = routed.base_layer
    masks, counts = {}, []
    for e in range(base.num_experts):
        keep = chosen[:, e] & visual
        counts.append(int(keep.sum()))
        rows = flat[keep] * torch.sigmoid(logits[keep, e, None])
        with torch.no_grad():
            gate, up = (rows @ base.gate_up_proj[e]).chunk(2, dim=-1)
            inner = up * nn.functional.silu(gate)
        for name, read in (("gate_up_proj", rows), ("down_proj", inner)):
            weight = getattr(base, name)[e].T.detach().float()  # stored transposed: (in, out)
            norms = read.float().pow(2).sum(dim=0) / batch
            scores = weight.abs() * norms.sqrt() if counts[-1] else weight.abs()
            masks[f"{name}[{e}]"] = _hand_row_mask(scores, SPARSITY)
    return masks, counts


def _mlp_input_of(model, block, inputs):
    """The (B, T, H) input of ``block`` in the model's own (probed) forward."""
    seen = {}
    handle = block.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["x"]


def test_pruning_llamas_visual_path_prunes_its_scaled_experts_from_routed_visual_tokens():
    """llama4_text: the text path stays bitwise dense (and text-only inputs give the original logits), every
    visual expert row holds exactly int(cols * s) zeros, and the masks equal a hand computation from the
    router-scaled visual tokens the router sent to each expert."""
    model, inputs, image = _llama4()
    original = copy.deepcopy(model)
    probe = attach_probe_(model)
    text_before = [p.clone() for p in probe.path_parameters("text")]
    report = probe.prune_path_("visual", PruneConfig("wanda", sparsity=SPARSITY, pool="visual"), [inputs],
                               progress=False, keep_masks=True)
    assert all(torch.equal(a, b) for a, b in zip(text_before, probe.path_parameters("text")))
    plain = {"input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == image, 7),
             "attention_mask": inputs["attention_mask"]}
    assert torch.equal(_logits(model, plain), _logits(original, plain))
    routed = probe.experts[1]["feed_forward.experts"]
    visual = routed.path("visual")
    for param in (visual.gate_up_proj, visual.down_proj):  # (E, in, out): rows of the (out, in) matrix are dim 2
        assert bool(((param == 0).sum(dim=1) == int(param.shape[1] * SPARSITY)).all())
    for module in (*probe.routed[1].values(), routed):  # layer 1's statistics came from its dense pass
        module.reset_("visual")
    expected, counts = _llama4_hand_visual_masks(model, inputs, image, routed)
    stats = report.layers[1].experts["feed_forward.experts"]
    assert stats["pooled_tokens"] == counts and stats["unrouted"] == [e for e, n in enumerate(counts) if n == 0]
    assert sum(counts) == 2 * int(((inputs["input_ids"] == image) & inputs["attention_mask"].bool()).sum())  # top-2
    differs_from_magnitude = 0
    for key, mask in expected.items():
        assert torch.equal(report.masks[f"model.layers.1.feed_forward.experts.{key}"], mask), key
        name, _, e = key[:-1].partition("[")
        weight = getattr(routed.base_layer, name)[int(e)].T.detach().float()
        differs_from_magnitude += not torch.equal(mask, _hand_row_mask(weight.abs(), SPARSITY))
        assert torch.equal(getattr(visual, name)[int(e)].T == 0, mask)  # the mask is what was applied
    assert differs_from_magnitude > 0  # the check tells Wanda from magnitude
