"""What the families of tests/recipes_c.py needed beyond a recipe (the five checks themselves run in
tests/test_families.py for every recipe)."""

import copy

import pytest
import recipes_c
import tiny_families
import torch
from family_checks import check_discovery, check_probe, check_replay, check_save, last_layer_output, replayed
from tiny_families import FamilyUnavailable, build_family

from pruning.adapters import GenericAdapter, get_adapter
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
