"""Capture and replay of families whose decoder layers pass state to the next layer: the replay hands it on as the
model's loop does (exact at any batch size), or the model is refused with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from family_checks import check_probe, check_prune, check_replay, last_layer_output, replayed
from recipes_c import RECIPES as RECIPES_C
from recipes_moe import RECIPES as RECIPES_MOE
from tiny_families import RECIPES, build_family

from pruning.adapters import GenericAdapter, get_adapter, layer_loop
from pruning.errors import UnsupportedModelError
from pruning.replay import propagate_, replay_layers

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


def _shared(family: str, monkeypatch, batch: int = 2):
    monkeypatch.setitem(RECIPES, family, _shared_indexer(family))
    model, inputs = build_family(family, batch=batch)
    assert get_adapter(model).decoder_layers(model)[1].self_attn.indexer is None  # layer 1 reuses layer 0's top-k
    return model, inputs


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_a_shared_indexer_replays_prunes_and_probes_exactly(family, batch, monkeypatch):
    """The replay hands layer 0's top-k to layer 1 as the model's loop does: bitwise the model's forward."""
    model, inputs = _shared(family, monkeypatch, batch)
    check_replay(model, inputs)
    check_prune(model, inputs, "wanda")
    check_probe(*_shared(family, monkeypatch, batch))


@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_the_carried_top_k_is_what_layer_1_reads(family, monkeypatch):
    """Another batch's top-k in its place changes layer 1's output: the state matters, and it is carried."""
    model, inputs = _shared(family, monkeypatch, batch=2)
    adapter = get_adapter(model)
    with torch.no_grad():
        batch = adapter.capture(model, inputs)
        assert batch.layer_kwargs[1]["prev_topk_indices"] is None  # capture records no state ...
        run = batch.fork()
        h1 = adapter.replay(model, 0, run.hidden, run)
        topk = run.layer_kwargs[1]["prev_topk_indices"]
        assert torch.is_tensor(topk) and batch.layer_kwargs[1]["prev_topk_indices"] is None  # ... the fork carries it
        want = adapter.replay(model, 1, h1, run)
        wrong = run.fork()
        wrong.layer_kwargs[1]["prev_topk_indices"] = topk.flip(0)
        assert not torch.equal(adapter.replay(model, 1, h1, wrong), want)


@pytest.mark.parametrize("family", TOPK_FAMILIES)
def test_a_replay_from_mid_stack_reads_the_state_its_source_run_kept(family, monkeypatch):
    model, inputs = _shared(family, monkeypatch)
    adapter = get_adapter(model)
    with torch.no_grad():
        batch = adapter.capture(model, inputs)
        dense = batch.fork()
        inputs_of = [step.inputs for step in replay_layers(model, adapter, [dense], range(2))]
        again = dense.fork(hidden=inputs_of[1])
        propagate_(model, adapter, [again], [1])
        assert torch.equal(again.hidden, dense.hidden) and torch.equal(again.hidden, last_layer_output(model, inputs))
        with pytest.raises(UnsupportedModelError, match="layer 0 was not replayed on this batch first"):
            adapter.replay(model, 1, inputs_of[1], batch.fork())  # a fresh capture has no state for layer 1


def _inkling2_blocks(layers: int):
    recipe = RECIPES_MOE["inkling2"]

    def edit(c):
        recipe.edit(c)
        c.text_config.num_hidden_layers = layers
        c.text_config.layer_types = ["hybrid_sliding", "hybrid"] * (layers // 2)

    return dataclasses.replace(recipe, edit=edit)


@pytest.mark.parametrize("batch", [1, 2])
def test_inkling2_with_two_residual_blocks_replays_prunes_and_probes_exactly(batch, monkeypatch):
    """Its loop grows ``block_states`` after each block-boundary layer; the registered adapter's replay grows it
    the same way: bitwise the model's forward."""
    monkeypatch.setitem(RECIPES, "inkling2", _inkling2_blocks(4))
    model, inputs = build_family("inkling2", batch=batch)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    assert len(layers) == 4 and [layer.is_block_boundary for layer in layers] == [True, False, True, False]
    assert layer_loop(adapter.language_model(model), layers).rebuilt == ("block_states",) == adapter.rebuilds
    check_replay(model, inputs)
    check_prune(model, inputs, "wanda")
    check_probe(*build_family("inkling2", batch=batch))


def test_a_loop_that_rebuilds_layer_arguments_is_refused_without_an_adapter_that_rebuilds_them(monkeypatch):
    monkeypatch.setitem(RECIPES, "inkling2", _inkling2_blocks(4))
    model, inputs = build_family("inkling2")
    with pytest.raises(UnsupportedModelError, match="rebuilds the argument 'block_states' of layer 3"):
        GenericAdapter().capture(model, inputs)


def test_inkling2_block_states_computed_on_a_device_copy_are_kept_in_the_batch(monkeypatch):
    monkeypatch.setitem(RECIPES, "inkling2", _inkling2_blocks(4))
    model, inputs = build_family("inkling2")
    adapter = get_adapter(model)
    monkeypatch.setattr("pruning.replay.on_device", lambda batch, device: batch.to(device))
    with torch.no_grad():
        batch = adapter.capture(model, inputs).fork()
        propagate_(model, adapter, [batch], range(4))
    assert batch.layer_kwargs[3]["block_states"].shape[-2] == 2  # the inputs of layers 0 and 2
    assert torch.equal(batch.hidden, last_layer_output(model, inputs))


def test_inkling2_with_one_residual_block_still_replays_exactly():
    model, inputs = build_family("inkling2")
    check_replay(model, inputs)
    assert torch.is_tensor(replayed(model, inputs))


def test_state_computed_on_a_device_copy_is_kept_in_the_batch(monkeypatch):
    """With offload a layer runs on a copy of the batch on its execution device: the state it hands the next layer
    is written back to the batch (forced here on one device by making every move a copy)."""
    model, inputs = _shared("glm5_next", monkeypatch)
    adapter = get_adapter(model)
    monkeypatch.setattr("pruning.replay.on_device", lambda batch, device: batch.to(device))
    with torch.no_grad():
        batch = adapter.capture(model, inputs).fork()
        propagate_(model, adapter, [batch], range(2))
    assert torch.is_tensor(batch.layer_kwargs[1]["prev_topk_indices"])
    assert torch.equal(batch.hidden, last_layer_output(model, inputs))
