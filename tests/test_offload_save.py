"""Saving a disk-offloaded model in bounded shards: the memory of saving stays bounded by a shard
(transformers materialises a shard's offloaded weights at once), and the saved model is the same."""

import json

import torch
from safetensors.torch import load_file
from tiny_models import build_tiny

from pruning.io import load_model, save_pruned
from pruning.offload import MIN_SHARD_BYTES, save_shard_size


def test_shard_size_only_for_offloaded_models(tmp_path):
    model, _ = build_tiny("llava")
    assert save_shard_size(model) is None  # nothing offloaded: transformers' default
    model.save_pretrained(tmp_path / "checkpoint")
    offloaded, _ = load_model(tmp_path / "checkpoint", with_processor=False, offload_folder=tmp_path / "offload")
    assert save_shard_size(offloaded) == MIN_SHARD_BYTES  # tiny layers: the floor keeps one file


def test_offloaded_model_saved_in_layer_shards_is_the_same(tmp_path, monkeypatch):
    model, _ = build_tiny("llava")
    model.save_pretrained(tmp_path / "checkpoint")
    offloaded, _ = load_model(tmp_path / "checkpoint", with_processor=False, offload_folder=tmp_path / "offload")
    monkeypatch.setattr("pruning.offload.MIN_SHARD_BYTES", 1)  # shards of one offloaded module (a Linear here)
    largest = max(p.numel() * p.element_size() for p in model.model.language_model.layers.parameters())
    assert save_shard_size(offloaded) == largest
    out = save_pruned(offloaded, None, {}, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    saved = {k: v for f in files for k, v in load_file(out / f).items()}
    original = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
