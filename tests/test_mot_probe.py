"""MoT probe surgery: exactness before pruning, routing, per-path pruning isolation, unload and bad input."""

import copy

import pytest
import torch
from family_checks import check_generation_with_probe
from tiny_models import FAMILIES, IMAGE, build_tiny
from torch import nn

from mot_probe import PATHS, RoutedLinear, attach_probe_, get_probe, probe_pool
from mot_probe.routing import ModalityRouter, RoutingError
from mot_probe.surgery import ROUTED, ProbeError
from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks
from pruning.errors import ConfigError


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _text_only(model, inputs):
    """The same batch with every image token replaced by a text token and no image inputs."""
    ids = inputs["input_ids"].clone()
    ids[ids == IMAGE] = 7
    return {"input_ids": ids, "attention_mask": inputs["attention_mask"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_probe_computes_exactly_the_original(family):
    model, inputs = build_tiny(family, batch=2, padded=True)
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    probe = attach_probe_(model)
    assert sum(isinstance(m, RoutedLinear) for m in model.modules()) == len(ROUTED) * len(probe.routed)
    assert probe.extra_parameters() == 0
    assert torch.equal(_logits(model, inputs), _logits(original, inputs))
    probe.unload()
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_probe_generates_exactly_the_original(family):
    check_generation_with_probe(*build_tiny(family, batch=1))


def test_unpruned_probe_is_exact_in_bf16():
    model, inputs = build_tiny("llava", batch=2, padded=True, dtype=torch.bfloat16)
    original = copy.deepcopy(model)
    attach_probe_(model)
    assert torch.equal(_logits(model, inputs), _logits(original, inputs))


def test_routed_linear_sends_each_token_through_its_own_copy():
    torch.manual_seed(0)
    router = ModalityRouter()
    routed = RoutedLinear(nn.Linear(4, 3), router)
    routed.materialise_("visual").weight.data.mul_(-2)  # the visual copy now differs
    x = torch.randn(2, 5, 4)
    visual = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    with router.route(visual):
        out = routed(x)
    assert torch.allclose(out[visual], routed.paths["visual"](x[visual]))
    assert torch.allclose(out[~visual], routed.base_layer(x[~visual]))
    with pytest.raises(RoutingError, match=r"shape \(2, 5\)"):
        routed(x)  # no mask outside a routed forward


def test_sibling_projections_reuse_the_split_rows_but_see_in_place_changes():
    torch.manual_seed(0)
    router = ModalityRouter()
    q, k = (RoutedLinear(nn.Linear(4, 3), router) for _ in range(2))
    for routed in (q, k):
        routed.materialise_("visual").weight.data.mul_(-2)
    x = torch.randn(1, 4, 4)
    visual = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    with router.route(visual):
        q(x)
        out_k = k(x)  # same input object: served from the router's cached rows
        assert torch.equal(out_k[visual], k.paths["visual"](x[visual]))
        assert torch.equal(out_k[~visual], k.base_layer(x[~visual]))
        x.mul_(3)  # an in-place change must not be served from the cache
        out_q = q(x)
        assert torch.equal(out_q[visual], q.paths["visual"](x[visual]))
        assert torch.equal(out_q[~visual], q.base_layer(x[~visual]))
    assert router.visual is None and router._rows is None


def test_materialised_but_unpruned_paths_still_compute_the_original():
    model, inputs = build_tiny("llava_next", batch=2, padded=True)
    original = copy.deepcopy(model)
    probe = attach_probe_(model)
    for routed in probe.routed_linears():
        routed.materialise_("text"), routed.materialise_("visual")
    assert torch.allclose(_logits(model, inputs), _logits(original, inputs), atol=1e-5)


@pytest.fixture(scope="module")
def calibration():
    model, _ = build_tiny("llava", seed=0)
    return model, [build_tiny("llava", seed=s, batch=2, padded=True)[1] for s in range(2)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pool", ["text", "visual", "mixed"])
def test_pruning_one_path_leaves_the_other_bit_identical(calibration, path, pool):
    model, batches = calibration
    model = copy.deepcopy(model)
    probe = attach_probe_(model)
    other = "visual" if path == "text" else "text"
    before = [p.clone() for p in probe.path_parameters(other)]
    report = probe.prune_path_(path, PruneConfig("wanda", sparsity=0.5, pool=probe_pool(pool)), batches,
                               progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, probe.path_parameters(other)))
    for routed in probe.routed_linears():
        zeros = (routed.path(path).weight == 0).sum(dim=1)
        assert zeros.tolist() == [routed.in_features // 2] * routed.out_features
    assert set(report.layers[0].sparsity) == set(ROUTED)
    routed_params = sum(p.numel() for r in probe.routed_linears() for p in r.base_layer.parameters())
    assert probe.extra_parameters() == routed_params  # one copy: the pruned path's Linears only


def test_pruning_the_visual_path_changes_nothing_for_text_only_inputs(calibration):
    model, batches = calibration
    model = copy.deepcopy(model)
    original = copy.deepcopy(model)
    probe = attach_probe_(model)
    probe.prune_path_("visual", PruneConfig("wanda", sparsity=0.6, pool="all"), batches, progress=False)
    text = _text_only(model, batches[0])
    assert torch.equal(_logits(model, text), _logits(original, text))
    assert not torch.allclose(_logits(model, batches[0]), _logits(original, batches[0]))
    probe.reset_("visual")
    assert torch.equal(_logits(model, batches[0]), _logits(original, batches[0]))


def test_probe_statistics_match_the_plain_engine(calibration):
    # Layer 0's q/k/v/gate/up inputs do not depend on routing, so the text path's masks under the
    # mixed pool must equal plain Wanda's masks on the unprobed model.
    model, batches = calibration
    plain = compute_masks(copy.deepcopy(model), PruneConfig("wanda", layers=(0,)), batches, progress=False).masks
    probed = copy.deepcopy(model)
    report = attach_probe_(probed).prune_path_("text", PruneConfig("wanda", layers=(0,)), batches, progress=False,
                                               keep_masks=True)
    for name in ROUTED[:-1]:  # down_proj's input comes from the routed gate/up
        key = next(k for k in report.masks if k.endswith(f"layers.0.{name}"))
        assert torch.equal(report.masks[key], plain[key]), name


def test_unload_keeps_the_chosen_path(calibration):
    model, batches = calibration
    model = copy.deepcopy(model)
    keys = list(model.state_dict())
    probe = attach_probe_(model)
    probe.prune_path_("text", PruneConfig("magnitude", sparsity=0.5), progress=False)
    text_weights = [r.path("text").weight.clone() for r in probe.routed_linears()]
    probe.unload(keep="text")
    assert list(model.state_dict()) == keys
    adapter = get_adapter(model)
    names = [n for n in ROUTED]
    kept = [adapter.named_linears(model, i, tuple(names))[n].weight for i in range(2) for n in names]
    assert all(torch.equal(a, b) for a, b in zip(text_weights, kept))
    with pytest.raises(ProbeError, match="carries no MoT probe"):
        get_probe(model)


def test_bad_input(calibration):
    model, batches = calibration
    model = copy.deepcopy(model)
    probe = attach_probe_(model)
    with pytest.raises(ValueError, match="unknown pathway 'audio'"):
        probe.prune_path_("audio", PruneConfig("wanda"), batches, progress=False)
    with pytest.raises(ConfigError, match="unknown probe pool 'pixels'"):
        probe_pool("pixels")
    with pytest.raises(ConfigError, match="not routed"):
        probe.prune_path_("text", PruneConfig("wanda", targets=("self_attn.o_proj",)), batches, progress=False)
    with pytest.raises(ProbeError, match="already carries a probe"):
        attach_probe_(model)
    probe.prune_path_("text", PruneConfig("magnitude"), progress=False)
    embeds = model.get_input_embeddings()(_text_only(model, batches[0])["input_ids"])
    with pytest.raises(RoutingError, match="input_ids"):
        with torch.no_grad():
            model(inputs_embeds=embeds)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cached_decoding_routes_new_tokens_as_text(family):
    # With the text path pruned, greedy decoding with a KV cache (new tokens alone in each step) must
    # match decoding without a cache (the whole sequence re-run, image tokens routed visual each time).
    model, inputs = build_tiny(family, batch=1)
    probe = attach_probe_(model)
    probe.prune_path_("text", PruneConfig("magnitude", sparsity=0.5), progress=False)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sparsegpt_prunes_one_path_and_updates_only_that_path(calibration):
    model, batches = calibration
    model = copy.deepcopy(model)
    probe = attach_probe_(model)
    visual_before = [p.clone() for p in probe.path_parameters("visual")]
    base_before = [r.base_layer.weight.clone() for r in probe.routed_linears()]
    probe.prune_path_("text", PruneConfig("sparsegpt", sparsity=0.5, pool="visual"), batches, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(visual_before, probe.path_parameters("visual")))
    for routed, base in zip(probe.routed_linears(), base_before):
        text = routed.path("text").weight
        assert float((text == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
        kept = text != 0
        assert not torch.equal(text[kept], base[kept])  # OBS updated the surviving weights of the text copy
