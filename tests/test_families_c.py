"""What the families of tests/recipes_c.py needed beyond a recipe (the five checks themselves run in
tests/test_families.py for every recipe)."""

import copy

import pytest
import recipes_c
import tiny_families
import torch
from family_checks import check_discovery, check_probe, check_replay, check_save, last_layer_output, replayed
from tiny_families import FamilyUnavailable, build_family

from mot_probe.routing import ModalityRouter, RoutedLinear, RoutingError
from pruning.adapters import GenericAdapter, get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks
from pruning.errors import UnsupportedModelError


def _build(family):
    try:
        return build_family(family)
    except FamilyUnavailable as err:
        pytest.skip(str(err))


def test_granite4_vision_features_added_before_a_later_layer_are_replayed():
    model, inputs = _build("granite4_vision")
    adapter = get_adapter(model)
    assert adapter.name == "granite4_vision"
    batch = adapter.capture(model, inputs)
    assert sorted(batch.extras["deepstack_features"]) == [0, 1]  # before layer 0 (captured) and layer 1
    want = last_layer_output(model, inputs)
    assert torch.equal(replayed(model, inputs), want)
    # the structural fallback alone misses the addition before layer 1: its replay check refuses
    with pytest.raises(UnsupportedModelError, match="granite4_vision.*differs from its forward"):
        GenericAdapter().capture(model, inputs)


@pytest.mark.parametrize("family", list(recipes_c.PENDING))
def test_pending_families_pass_every_check_but_the_prune(family, monkeypatch, tmp_path):
    monkeypatch.setitem(tiny_families.RECIPES, family, recipes_c.PENDING[family])
    model, inputs = _build(family)
    check_discovery(model)
    check_replay(model, inputs)
    check_probe(copy.deepcopy(model), inputs)
    check_save(model, tmp_path)


def _on_meta(model_type, **text_fields):
    """The shrunk default ``model_type`` model, built on the meta device (structure only)."""
    import transformers as tf
    from tiny_kit import shrink
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = shrink(CONFIG_MAPPING[model_type]())
    for key, value in text_fields.items():
        setattr(config.get_text_config(), key, value)
    with torch.device("meta"):
        return tf.AutoModelForImageTextToText.from_config(config)


def test_git_refusal_names_its_text_stack_under_an_encoder_named_module():
    with pytest.raises(UnsupportedModelError, match=r"none outside the parts named as vision towers or encoders, "
                                                    r"which hold \[.*'git\.encoder\.layer'\]"):
        get_adapter(_on_meta("git"))


def test_idefics_refusal_names_both_interleaved_block_lists():
    with pytest.raises(UnsupportedModelError, match=r"\['model\.layers', 'model\.gated_cross_attn_layers'\] "
                                                    r"\(several lists"):
        get_adapter(_on_meta("idefics"))


def test_block_diffusion_decoder_reading_an_encoder_cache_is_refused_by_name():
    model = _on_meta("diffusion_gemma", num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    with pytest.raises(UnsupportedModelError, match="'diffusion_gemma'.*decoder model.decoder takes decoder_input_ids"):
        get_adapter(model)
    # a decoder-only LM under a model whose own forward also takes decoder_input_ids (for its T5 variants) is kept
    blip2 = _on_meta("blip-2")
    assert len(get_adapter(blip2).decoder_layers(blip2)) == blip2.config.get_text_config().num_hidden_layers


def test_mllama_cross_attention_kv_statistics_use_every_row_of_the_image_memory():
    model, inputs = _build("mllama")
    k_proj = model.model.language_model.layers[1].cross_attn.k_proj
    seen = {}
    hook = k_proj.register_forward_hook(lambda _m, args, _out: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        hook.remove()
    memory = seen["x"]  # (tiles, patches, C): not the (B, T) tokens
    assert memory.shape[:-1] != inputs["input_ids"].shape
    norms = (memory.reshape(-1, memory.shape[-1]).double() ** 2).sum(dim=0)  # every row, whatever the pool
    scores = k_proj.weight.detach().double().abs() * norms.sqrt()
    order = torch.sort(scores, dim=1, stable=True).indices[:, : k_proj.in_features // 2]
    want = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    name = "model.language_model.layers.1.cross_attn.k_proj"
    for pool in ("text", "atv"):  # the pool chooses among tokens only
        report = compute_masks(model, PruneConfig("wanda", sparsity=0.5, pool=pool), [inputs], progress=False)
        assert torch.equal(report.masks[name], want)
        assert report.layers[1].memory_inputs == ["cross_attn.k_proj", "cross_attn.v_proj"]
        assert report.layers[0].memory_inputs == []
    # TAMP ranks tokens by self-attention, which a cross-attention layer does not have
    with pytest.raises(UnsupportedModelError, match="MllamaCrossAttentionDecoderLayer has no self-attention"):
        compute_masks(model, PruneConfig("tamp", sparsity=0.5), [inputs], progress=False)


def test_a_routed_projection_sends_rows_that_are_not_tokens_through_the_visual_copy():
    torch.manual_seed(0)
    router = ModalityRouter()
    routed = RoutedLinear(torch.nn.Linear(4, 3), router)
    routed.materialise_("visual").weight.data.mul_(-2)
    memory = torch.randn(3, 7, 4)  # e.g. image tiles x patches, read by a cross-attention K/V
    with_image = torch.zeros(2, 5, dtype=torch.bool)
    with_image[0, 1] = True  # the batch's image placeholder
    with router.route(with_image):
        out = routed(memory)
    assert torch.equal(out, routed.paths["visual"](memory))
    assert not torch.allclose(out, routed.base_layer(memory))
    # without an image in the batch such rows cannot be the image memory: refused, naming both shapes
    with router.route(torch.zeros(2, 5, dtype=torch.bool)), \
            pytest.raises(RoutingError, match=r"input rows \(3, 7\) are not the batch's tokens \(2, 5\)"):
        routed(memory)


def test_capture_refuses_a_decoder_sequence_longer_than_input_ids():
    from tiny_models import build_tiny

    model, inputs = build_tiny("llava")

    def prepend_one(_module, args, kwargs):  # as GIT does with its image features
        embeds = kwargs["inputs_embeds"]
        return args, {**kwargs, "inputs_embeds": torch.cat([embeds[:, :1], embeds], dim=1), "attention_mask": None}

    handle = model.model.language_model.register_forward_pre_hook(prepend_one, with_kwargs=True)
    try:
        n = inputs["input_ids"].shape[1]
        with pytest.raises(UnsupportedModelError, match=rf"runs on \(1, {n + 1}\) positions, input_ids has \(1, {n}\)"):
            get_adapter(model).capture(model, inputs)
    finally:
        handle.remove()
    get_adapter(model).capture(model, inputs)  # the model itself is fine


def test_ernie_expert_sets_are_pruned_from_the_tokens_each_reads():
    """ERNIE 4.5 VL's vision experts read only the vision-typed tokens (in (B, T) order): the masks of each vision
    expert equal a hand computation from the visual tokens its router sent to it, the text set gets no visual
    token; under the probe each set belongs to its pathway (pruning one pathway never copies the other's set)."""
    from mot_probe import attach_probe_
    from mot_probe.experts import PathExperts

    model, inputs = _build("ernie4_5_vl_moe")
    mlp = get_adapter(model).decoder_layers(model)[1].mlp
    seen = {}
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(**inputs, use_cache=False)
    handle.remove()
    report = compute_masks(model, PruneConfig("wanda", sparsity=0.5, pool="visual", layers=(1,)), [inputs],
                           progress=False)
    types = inputs["moe_mm_token_type_ids"].reshape(-1).bool()
    visual = (inputs["input_ids"].reshape(-1) == tiny_families.IMAGE) & inputs["attention_mask"].reshape(-1).bool()
    rows = seen["x"].reshape(-1, seen["x"].shape[-1])[types]  # what the vision set reads, in (B, T) order
    experts = mlp.vision_moe.experts
    with torch.no_grad():
        chosen = mlp.vision_moe.gate(rows)[2]  # (n, k)
    stats = report.layers[0].experts
    assert stats["mlp.text_moe.experts"]["pooled_tokens"] == [0] * 4
    for e in range(4):
        keep = (chosen == e).any(dim=1) & visual[types]
        assert stats["mlp.vision_moe.experts"]["pooled_tokens"][e] == int(keep.sum())
        with torch.no_grad():
            gate, up = torch.nn.functional.linear(rows[keep], experts.gate_up_proj[e]).chunk(2, dim=-1)
            inner = experts.act_fn(gate) * up
        for name, read in (("gate_up_proj", rows[keep]), ("down_proj", inner)):
            norms = read.float().pow(2).sum(dim=0) / 2
            scores = getattr(experts, name)[e].detach().float().abs() * norms.sqrt()
            n = int(scores.shape[1] * 0.5)
            want = torch.zeros_like(scores, dtype=torch.bool)
            want.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :n], True)
            got = report.masks[f"model.language_model.layers.1.mlp.vision_moe.experts.{name}[{e}]"]
            assert torch.equal(got, want), (name, e)
    probe = attach_probe_(model)
    sets = probe.experts[1]
    assert {n: (type(m), m.owner) for n, m in sets.items()} == {
        "mlp.text_moe.experts": (PathExperts, "text"), "mlp.vision_moe.experts": (PathExperts, "visual")}
    probe.prune_path_("visual", PruneConfig("wanda", sparsity=0.5, pool="visual"), [inputs], progress=False)
    assert list(sets["mlp.vision_moe.experts"].paths) == ["visual"] and not sets["mlp.text_moe.experts"].paths
    probe.unload()
