"""Capture and replay of families whose decoder layers pass state to the next layer: the layer-by-layer replay is
exact at any batch size, or the model is refused with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from family_checks import check_prune, check_replay, replayed
from recipes_c import RECIPES as RECIPES_C
from recipes_moe import RECIPES as RECIPES_MOE
from tiny_families import RECIPES, build_family

from pruning import PruneConfig, prune_
from pruning.adapters import get_adapter, layer_loop
from pruning.errors import UnsupportedModelError

TOPK_FAMILIES = ("glm5_next", "hy_v4_vl")  # layers return (hidden, top-k); the loop passes the top-k on


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_tuple_returning_layers_capture_and_replay_exactly_at_any_batch_size(family, batch):
    model, inputs = build_family(family, batch=batch)
    assert inputs["input_ids"].shape[0] == batch
    check_replay(model, inputs)


@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_the_loop_of_tuple_returning_layers_is_read_from_the_forward(family):
    model, _ = build_family(family)
    adapter = get_adapter(model)
    loop = layer_loop(adapter.language_model(model), adapter.decoder_layers(model))
    assert (loop.arity, loop.carried, loop.rebuilt) == (2, {"prev_topk_indices": 1}, ())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_pruning_runs_at_any_batch_size(family, batch):
    check_prune(*build_family(family, batch=batch), "wanda")


def _shared_indexer(family: str):
    """The family's tiny recipe with layer 1 reusing layer 0's top-k (a "shared" indexer)."""
    recipe = RECIPES_C[family]

    def edit(c):
        recipe.edit(c)
        c.text_config.layer_types = ["indexed_attention", "indexed_attention"]
        c.text_config.indexer_types = ["full", "shared"]

    return dataclasses.replace(recipe, edit=edit)


@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_a_shared_indexer_is_refused_naming_the_state(family, monkeypatch):
    monkeypatch.setitem(RECIPES, family, _shared_indexer(family))
    model, inputs = build_family(family)
    layers = get_adapter(model).decoder_layers(model)
    assert layers[1].self_attn.indexer is None  # the recipe builds what the test means
    with pytest.raises(UnsupportedModelError, match="layer 1 reads 'prev_topk_indices' from the previous layer"):
        replayed(model, inputs)


def _inkling2_blocks(layers: int):
    recipe = RECIPES_MOE["inkling2"]

    def edit(c):
        recipe.edit(c)
        c.text_config.num_hidden_layers = layers
        c.text_config.layer_types = ["hybrid_sliding", "hybrid"] * (layers // 2)

    return dataclasses.replace(recipe, edit=edit)


def test_inkling2_with_two_residual_blocks_is_refused_before_the_replay_check(monkeypatch):
    monkeypatch.setitem(RECIPES, "inkling2", _inkling2_blocks(4))
    model, inputs = build_family("inkling2")
    adapter = get_adapter(model)
    assert len(adapter.decoder_layers(model)) == 4
    assert layer_loop(adapter.language_model(model), adapter.decoder_layers(model)).rebuilt == ("block_states",)
    with pytest.raises(UnsupportedModelError, match="rebuilds the argument 'block_states' of layer 3"):
        adapter.capture(model, inputs)
    with pytest.raises(UnsupportedModelError, match="block_states"):
        prune_(model, PruneConfig("wanda", sparsity=0.5), [inputs], progress=False)


def test_inkling2_with_one_residual_block_still_replays_exactly():
    model, inputs = build_family("inkling2")
    check_replay(model, inputs)
    assert torch.is_tensor(replayed(model, inputs))
