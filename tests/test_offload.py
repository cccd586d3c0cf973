"""Layer-at-a-time pruning of offloaded models (accelerate hooks): the same masks and weights as pruning
the model in memory, whether the engine offloads the layers itself or the model comes dispatched from a
checkpoint with some layers on disk."""

import copy

import pytest
import torch
from tiny_models import build_tiny

from pruning.adapters import get_adapter
from pruning.config import PruneConfig
from pruning.engine import compute_masks, prune_
from pruning.execution import ExecutionConfig
from pruning.io import load_model
from pruning.offload import offload_device_map, offloaded_modules, onloaded


@pytest.fixture(scope="module")
def llava():
    model, _ = build_tiny("llava", seed=0)
    batches = [build_tiny("llava", seed=s, batch=2, padded=True)[1] for s in range(2)]
    return model, batches


def _decoder_weights(model):
    adapter = get_adapter(model)
    return {f"{i}.{n}": lin.weight.detach().clone() for i in range(len(adapter.decoder_layers(model)))
            for n, lin in adapter.named_linears(model, i).items()}


def _offloaded_weights(model):
    """Decoder Linear weights as the model's hooks would load them (materialised one module at a time)."""
    adapter = get_adapter(model)
    out = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        with onloaded(layer):
            out.update({f"{i}.{n}": lin.weight.detach().clone() for n, lin in adapter.named_linears(model, i).items()})
    return out


@pytest.mark.parametrize("method", ["wanda", "atv", "sparsegpt", "magnitude"])
def test_offload_flag_gives_bit_identical_masks_and_weights(llava, method):
    model, batches = llava
    plain, offloaded = copy.deepcopy(model), copy.deepcopy(model)
    reference = prune_(plain, PruneConfig(method), batches, keep_masks=True, progress=False)
    report = prune_(offloaded, PruneConfig(method), batches, execution=ExecutionConfig(offload=True), keep_masks=True,
                    progress=False)
    assert report.masks.keys() == reference.masks.keys()
    assert all(torch.equal(report.masks[k], reference.masks[k]) for k in reference.masks)
    assert not offloaded_modules(offloaded)  # hooks removed, weights back in place
    assert not any(hasattr(m, "_hf_hook") for m in offloaded.modules())
    pruned, expected = _decoder_weights(offloaded), _decoder_weights(plain)
    assert all(torch.equal(pruned[k], expected[k]) for k in expected)
    assert all(p.device.type == "cpu" for p in offloaded.parameters())


def test_compute_masks_with_offload_leaves_weights(llava):
    model, batches = llava
    before = _decoder_weights(model)
    work = copy.deepcopy(model)
    report = compute_masks(work, PruneConfig("atv"), batches, execution=ExecutionConfig(offload=True), progress=False)
    reference = compute_masks(copy.deepcopy(model), PruneConfig("atv"), batches, progress=False)
    assert all(torch.equal(report.masks[k], reference.masks[k]) for k in reference.masks)
    after = _decoder_weights(work)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _dispatched(tmp_path, model, layer_devices):
    """``model`` saved, then loaded with accelerate's dispatch: decoder layer i on ``layer_devices[i]``
    ("cpu" or "disk"), everything else on the CPU."""
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    from transformers import AutoModelForImageTextToText

    layers = get_adapter(model).decoder_layers(model)
    device_map = offload_device_map(model, layers, "cpu")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    for i, device in enumerate(layer_devices):
        device_map[f"{prefix}.{i}"] = device
    return AutoModelForImageTextToText.from_pretrained(checkpoint, device_map=device_map,
                                                       offload_folder=str(tmp_path / "offload"))


@pytest.mark.parametrize("layer_devices", [("disk", "disk"), ("cpu", "disk")])
def test_device_map_with_disk_layers_prunes_identically_and_saves(tmp_path, llava, layer_devices):
    model, batches = llava
    plain = copy.deepcopy(model)
    reference = prune_(plain, PruneConfig("atv"), batches, keep_masks=True, progress=False)
    dispatched = _dispatched(tmp_path, model, layer_devices)
    layers = get_adapter(dispatched).decoder_layers(dispatched)
    assert [bool(offloaded_modules(layer)) for layer in layers] == [d == "disk" for d in layer_devices]
    report = prune_(dispatched, PruneConfig("atv"), batches, keep_masks=True, progress=False)
    assert all(torch.equal(report.masks[k], reference.masks[k]) for k in reference.masks)
    pruned, expected = _offloaded_weights(dispatched), _decoder_weights(plain)
    assert all(torch.equal(pruned[k], expected[k]) for k in expected)
    dispatched.save_pretrained(tmp_path / "pruned")
    reloaded, _ = load_model(tmp_path / "pruned", with_processor=False)
    assert all(torch.equal(w, expected[k]) for k, w in _decoder_weights(reloaded).items())


def test_load_model_with_offload_folder_keeps_layers_on_disk(tmp_path, llava):
    model, batches = llava
    model.save_pretrained(tmp_path / "checkpoint")
    offloaded, _ = load_model(tmp_path / "checkpoint", with_processor=False, offload_folder=tmp_path / "offload")
    layers = get_adapter(offloaded).decoder_layers(offloaded)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert offloaded.get_input_embeddings().weight.device.type == "cpu"
    reference = compute_masks(copy.deepcopy(model), PruneConfig("wanda"), batches, progress=False)
    report = compute_masks(offloaded, PruneConfig("wanda"), batches, execution=ExecutionConfig(offload=True),
                           progress=False)
    assert all(torch.equal(report.masks[k], reference.masks[k]) for k in reference.masks)


def test_cli_offload_saves_the_same_pruned_model(tmp_path):
    from safetensors.torch import load_file
    from tiny_processors import save_model_dir, write_calibration

    from atv.cli import main

    model, _ = build_tiny("llava_next")
    model_dir = save_model_dir("llava_next", model, tmp_path / "dense")
    calib, images = write_calibration(tmp_path / "calib", n=3)
    common = ["prune", "--model", str(model_dir), "--method", "atv", "--calib", str(calib), "--images", str(images),
              "--nsamples", "3"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--offload", "--out", str(tmp_path / "offload")]) == 0
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    offload = load_file(tmp_path / "offload" / "model.safetensors")
    assert plain.keys() == offload.keys()
    assert all(torch.equal(plain[k], offload[k]) for k in plain)
    assert not any(p.name.startswith(".atv-offload-") for p in tmp_path.iterdir())  # temporary folder removed
