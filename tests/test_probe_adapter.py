"""The probe's adapter: made from the family's adapter class (nothing delegated by hand), handed to the engine
as an argument (nothing stored on the model), and routed modules that name what they wrap peft's way."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import IMAGE, build_tiny
from torch import nn

import pruning.adapters as adapters
from mot_probe import RoutedLinear, attach_probe_, get_probe
from mot_probe.routing import ModalityRouter
from mot_probe.surgery import ProbeError
from pruning.adapters import Adapter, GenericAdapter, get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks, prune_


@pytest.fixture(scope="module")
def structural():
    """glm4v_moe has no registered adapter: its blocks are found by structure (GenericAdapter)."""
    model, inputs = build_tiny("glm4v_moe", batch=2, padded=True)
    assert type(get_adapter(model)) is GenericAdapter
    assert bool((inputs["input_ids"] == IMAGE).any())
    return model, inputs


def test_a_probed_structural_family_checks_its_replay(structural, monkeypatch):
    # GenericAdapter.capture checks the layer-by-layer replay once per model; the probe's adapter must too, with
    # its own (routed) replay: with the other path already pruned, an unrouted replay would differ from the forward.
    model, inputs = copy.deepcopy(structural[0]), structural[1]
    calls = []
    original = adapters.check_replay

    def spy(adapter, *args, **kwargs):
        calls.append(adapter)
        return original(adapter, *args, **kwargs)

    monkeypatch.setattr(adapters, "check_replay", spy)
    probe = attach_probe_(model)
    probe.prune_path_("text", PruneConfig("magnitude", sparsity=0.5), progress=False)
    probe.prune_path_("visual", PruneConfig("wanda", sparsity=0.5, pool="all"), [inputs], progress=False)
    assert len(calls) == 1
    assert isinstance(calls[0], GenericAdapter) and calls[0] is not get_adapter(model)


def test_a_probed_structural_family_refuses_a_replay_that_differs(structural, monkeypatch):
    # The check is live on the probed model: a between-layer step the replay adds (and the forward lacks) is refused.
    model, inputs = copy.deepcopy(structural[0]), structural[1]
    probe = attach_probe_(model)
    kind = type(probe.adapter)
    monkeypatch.setattr(kind, "after_layer", lambda self, model, index, hidden, extras: hidden * 2, raising=False)
    with pytest.raises(adapters.UnsupportedModelError, match="replaying its decoder layers one by one differs"):
        probe.prune_path_("text", PruneConfig("wanda", sparsity=0.5), [inputs], progress=False)


def test_the_probe_adapter_is_the_family_adapter_with_routing(structural):
    model = copy.deepcopy(structural[0])
    family = get_adapter(model)
    probe = attach_probe_(model)
    assert isinstance(probe.adapter, type(family)) and isinstance(probe.adapter, Adapter)
    assert type(probe.adapter).capture is GenericAdapter.capture  # inherited, not hand-delegated
    assert probe.adapter.name == f"{family.name}+mot"
    assert probe.adapter.projections(model, 1).names == tuple(probe.routed[1])


def test_probing_stores_no_adapter_on_the_model(structural):
    model = copy.deepcopy(structural[0])
    before = set(vars(model))
    probe = attach_probe_(model)
    assert not hasattr(model, "_atv_adapter")
    assert not any(isinstance(v, Adapter) for v in vars(model).values())
    assert set(vars(model)) - before <= {"_forward_pre_hooks", "_forward_hooks"}  # only the routing hooks
    assert get_probe(model) is probe
    assert not isinstance(get_adapter(model), type(probe.adapter))  # the model's own family adapter
    with pytest.raises(ProbeError, match="already carries a probe"):
        attach_probe_(model)
    probe.unload()
    with pytest.raises(ProbeError, match="carries no MoT probe"):
        get_probe(model)


def test_the_engine_takes_the_probe_adapter_as_an_argument():
    model, _ = build_tiny("llava", seed=0)
    batches = [build_tiny("llava", seed=s, batch=2, padded=True)[1] for s in range(2)]
    config = PruneConfig("wanda", sparsity=0.5, layers=(0,))
    by_path = copy.deepcopy(model)
    expected = attach_probe_(by_path).prune_path_("text", config, batches, progress=False, keep_masks=True).masks
    probe = attach_probe_(model)
    probe._activate(0, "text", probe._path_config(config).targets)
    masks = compute_masks(model, probe._path_config(config), batches, adapter=probe.adapter, progress=False).masks
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    report = prune_(model, probe._path_config(config), batches, adapter=probe.adapter, progress=False)
    assert set(report.layers[0].sparsity) == set(probe.routed[0])


def test_routed_modules_keep_their_base_layer_peft_style():
    linear = nn.Linear(4, 3)
    routed = RoutedLinear(linear, ModalityRouter())
    assert routed.base_layer is linear and routed.get_base_layer() is linear
    assert [n for n, _ in routed.named_children()] == ["base_layer", "paths"]
    with pytest.warns(DeprecationWarning, match="base_layer"):
        assert routed.base is linear


def test_get_adapter_still_reads_an_attached_adapter_with_a_deprecation_warning():
    model, _ = build_tiny("llava")
    mine = type("Mine", (adapters.LlavaAdapter,), {})()
    model._atv_adapter = mine
    with pytest.warns(DeprecationWarning, match="adapter="):
        assert get_adapter(model) is mine
    del model._atv_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_adapter(model) is not mine
