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
    with pytest.raises(UnsupportedModelError, match="'diffusion_gemma'.*takes decoder_input_ids"):
        get_adapter(model)
