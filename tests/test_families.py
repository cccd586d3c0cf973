"""Families served by structural discovery (no registered adapter): blocks and projections found,
exact replay, exact probe, exact per-row sparsity, save/reload; plus the registered families'
discovery equal to today's seven names (so their masks stay bit-identical)."""

import copy
import functools

import pytest
import torch
from family_checks import (
    check_discovery,
    check_logits,
    check_probe,
    check_prune,
    check_replay,
    check_save,
    input_groups,
    last_layer_output,
    replayed,
)
from tiny_families import IMAGE, TESTED, FamilyUnavailable, build_family
from tiny_models import FAMILIES, build_tiny

from evaluation.prompt_fidelity import check_replayed_logits
from mot_probe import RoutedLinear, attach_probe_
from mot_probe.surgery import ProbeError
from pruning.adapters import DECODER_PROJ, Adapter, GenericAdapter, block_projections, find_decoder_layers, get_adapter
from pruning.config import PruneConfig
from pruning.engine import LayerPruner, compute_masks, prune_
from pruning.errors import UnsupportedModelError

# Hybrid decoders: some layers mix tokens by linear attention, convolution or a state-space model.
HYBRID = ("qwen3_5", "lfm2_vl", "bamba")


@functools.lru_cache(maxsize=None)
def _built(family):
    try:
        return build_family(family)
    except FamilyUnavailable as err:
        return err


def _fresh(family):
    """A private copy of the cached tiny model and its inputs (skips with the reason if unavailable)."""
    built = _built(family)
    if isinstance(built, Exception):
        pytest.skip(str(built))
    model, inputs = built
    return copy.deepcopy(model), inputs


@pytest.mark.parametrize("family", TESTED)
def test_discovery_finds_the_language_decoder_blocks(family):
    model, _ = _fresh(family)
    check_discovery(model)


@pytest.mark.parametrize("family", TESTED)
def test_replay_is_bitwise_equal_to_the_full_forward(family):
    check_replay(*_fresh(family))


# Families whose logits cannot be computed from the last decoder layer's output alone, each with the refusal its
# adapter gives (the sensitivity map then scores every cell by full forwards) and the reason measured on the tiny model.
LOGITS_NOT_REPLAYABLE = {
    # Inkling-2's language model mixes the last layer's output with the stacked inputs of its block-boundary layers
    # (final_input, a block attention residual) before the norm: left out, the logits differ by 0.474 (scale 0.580);
    # with the block states the last layer was given, they are bitwise the model's.
    "inkling2": "Inkling2TextModel calls final_input after its decoder layers with more than their output",
}


def _passes_or_is_refused(check, family: str) -> None:
    """``check`` passes on ``family``, or refuses it as :data:`LOGITS_NOT_REPLAYABLE` says."""
    model, inputs = _fresh(family)
    if family in LOGITS_NOT_REPLAYABLE:
        with pytest.raises(UnsupportedModelError, match=LOGITS_NOT_REPLAYABLE[family]):
            check(model, inputs)
    else:
        check(model, inputs)


@pytest.mark.parametrize("family", TESTED)
def test_final_norm_and_head_on_the_replay_give_the_models_logits(family):
    _passes_or_is_refused(check_logits, family)


# a family the runtime check refuses, and families whose tail is found or read from the config: hyper-connection
# streams (glm5_next: a mean, hy_v4_vl: a learned mix, qwen4_exp: a mixer with its own norm), Granite's
# logits_scaling, soft-capping (mistral_large4), Muse's multiplier
@pytest.mark.parametrize("family", [*LOGITS_NOT_REPLAYABLE, "glm5_next", "hy_v4_vl", "qwen4_exp", "granite_docling",
                                    "mistral_large4", "muse_spark"])
def test_the_sensitivity_maps_check_of_replayed_logits_refuses_exactly_the_listed_families(family):
    _passes_or_is_refused(check_replayed_logits, family)


def test_a_wrong_tail_is_caught_by_the_check_of_replayed_logits(monkeypatch):
    model, inputs = _fresh("glm5_next")
    monkeypatch.setattr(GenericAdapter, "after_head", lambda self, model, logits: logits * 1.01)
    with pytest.raises(UnsupportedModelError, match="the logits replayed from the decoder layers differ"):
        check_replayed_logits(model, inputs)


@pytest.mark.parametrize("family", HYBRID)
def test_hybrid_replay_keeps_no_state_between_batches(family):
    model, inputs = _fresh(family)
    first = replayed(model, inputs)
    other = {k: v.flip(0) if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
    replayed(model, other)
    assert torch.equal(replayed(model, inputs), first)


@pytest.mark.parametrize("family", TESTED)
def test_probe_is_exact_and_unloads_to_the_original_modules(family):
    check_probe(*_fresh(family))


@pytest.mark.parametrize("family", TESTED)
def test_pruning_zeroes_exactly_the_asked_share_of_every_row(family):
    model, inputs = _fresh(family)
    check_prune(model, inputs, "atv" if bool((inputs["input_ids"] == IMAGE).any()) else "wanda")


@pytest.mark.parametrize("family", TESTED)
def test_a_dense_pass_cut_at_the_last_input_gives_the_masks_of_the_whole_pass(family, monkeypatch):
    model, inputs = _fresh(family)
    for method in ("wanda", "sparsegpt"):
        cut = compute_masks(model, PruneConfig(method, sparsity=0.5), [inputs], progress=False).masks
        with monkeypatch.context() as patched:
            patched.setattr(LayerPruner, "_may_stop_early", lambda self: False)
            whole = compute_masks(model, PruneConfig(method, sparsity=0.5), [inputs], progress=False).masks
        assert cut.keys() == whole.keys()
        assert all(torch.equal(cut[name], whole[name]) for name in whole), method


@pytest.mark.parametrize("family", TESTED)
def test_save_and_reload_gives_the_same_weights(family, tmp_path):
    check_save(_fresh(family)[0], tmp_path)


@pytest.mark.parametrize("family, groups", [
    ("paligemma", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                   ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]),
    ("glm4v", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_up_proj",), ("mlp.down_proj",)]),
])
def test_projections_group_by_the_tensor_they_read(family, groups):
    assert input_groups(*_fresh(family)) == [groups]


def test_kv_sharing_layers_are_pruned_without_their_missing_k_and_v():
    model, inputs = _fresh("gemma4")
    adapter = get_adapter(model)
    names = [adapter.projections(model, i).names for i in range(4)]
    assert all("self_attn.k_proj" in n for n in names[:2]) and not any("self_attn.k_proj" in n for n in names[2:])
    batch = adapter.capture(model, inputs).to("cpu")  # as the engine keeps it: the shared K/V store stays shared
    h = batch.hidden
    with torch.no_grad():
        for i in range(4):
            h = adapter.replay(model, i, h, batch)
    assert torch.equal(h, last_layer_output(model, inputs))


def test_deepstack_found_by_structure_keeps_replay_exact():
    model, inputs = _fresh("qwen3_vl_moe")
    assert get_adapter(model).name == "generic"
    want = last_layer_output(model, inputs)
    assert not torch.equal(replayed(model, inputs, Adapter()), want)  # without DeepStack the replay drifts
    assert torch.equal(replayed(model, inputs), want)


def test_generic_capture_refuses_a_replay_that_drifts():
    model, inputs = _fresh("qwen3_vl_moe")

    class Blind(GenericAdapter):  # a fallback that does not know DeepStack
        record_extras, after_layer = Adapter.record_extras, Adapter.after_layer

    with pytest.raises(UnsupportedModelError, match="qwen3_vl_moe.*differs from its forward"):
        Blind().capture(model, inputs)
    GenericAdapter().capture(model, inputs)  # the real fallback passes its own check


def test_moe_experts_are_discovered_apart_and_pruned_per_expert_row():
    model, _ = _fresh("mistral4")
    moe = [i for i in range(2) if get_adapter(model).projections(model, i).skipped]
    assert moe == [1]
    skipped = get_adapter(model).projections(model, 1).skipped
    assert "expert" in skipped["mlp.experts"].lower() and skipped["mlp.gate"] == "MoE router"
    router = copy.deepcopy(model.model.layers[1].mlp.gate.state_dict())
    prune_(model, PruneConfig("magnitude", sparsity=0.5), progress=False)
    experts = model.model.layers[1].mlp.experts
    for weight in (experts.gate_up_proj, experts.down_proj):  # (E, out, in): every expert row half zero
        assert bool(((weight == 0).sum(dim=-1) == weight.shape[-1] // 2).all())
    assert all(torch.equal(v, router[k]) for k, v in model.model.layers[1].mlp.gate.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_registered_families_discover_exactly_the_seven_projections(family):
    model, _ = build_tiny(family)
    adapter = get_adapter(model)
    assert all(adapter.projections(model, i).names == DECODER_PROJ for i in range(len(adapter.decoder_layers(model))))
    assert find_decoder_layers(model)[1] is adapter.decoder_layers(model)


def test_discovery_sees_through_the_probe():
    model, _ = _fresh("paligemma")
    probe = attach_probe_(model)
    assert block_projections(model.model.language_model.layers[0]).names == DECODER_PROJ
    probe.unload()
    assert all(type(m) is torch.nn.Linear for n, m in model.model.language_model.layers[0].named_modules()
               if n.endswith("proj"))


def test_probe_refuses_a_projection_it_cannot_route():
    model, _ = _fresh("paligemma")

    class Opaque(torch.nn.Module):  # Linear-like, but not an nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner, self.in_features = inner, inner.in_features
            self.weight = inner.weight

        def forward(self, x):
            return self.inner(x)

    mlp = model.model.language_model.layers[1].mlp
    mlp.up_proj = Opaque(mlp.up_proj)
    with pytest.raises(ProbeError, match="mlp.up_proj of decoder layer 1.*Opaque"):
        attach_probe_(model)
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())


def test_encoder_decoder_language_models_are_refused_by_name():
    model, _ = build_tiny("llava")
    model.config.model_type = "my_seq2seq_vlm"
    model.config.get_text_config().is_encoder_decoder = True
    with pytest.raises(UnsupportedModelError, match="my_seq2seq_vlm.*encoder-decoder"):
        get_adapter(model)


def test_models_without_a_causal_lm_head_are_refused_by_name():
    model, _ = build_tiny("llava")
    model.model.config.model_type = "my_headless_vlm"
    with pytest.raises(UnsupportedModelError, match="my_headless_vlm.*no causal LM head"):
        get_adapter(model.model)
