"""Layer-at-a-time execution of offloaded models, on top of accelerate's hooks.

A model dispatched by accelerate (``from_pretrained(..., device_map=..., offload_folder=...)`` or
:func:`accelerate.dispatch_model`) keeps offloaded weights in a *weights map* (a CPU state dict, or
safetensors files memory-mapped from disk) and an ``AlignDevicesHook`` on each offloaded module
loads them onto the module's execution device for every forward and drops them afterwards. The
engine needs a layer's weights for longer than one forward (statistics, masks, several replays),
and must write the pruned weights back where the hook will find them. This module provides that:

* :func:`execution_device`: where a module runs (the hook's execution device, else its weights'
  device), so activations follow each layer in a multi-device ``device_map``;
* :func:`onloaded`: the layer's weights stay on the execution device for the whole block (accelerate's
  ``align_module_device``, with the per-forward reload switched off inside);
* :func:`write_back_`: the pruned weights into the weights map (a CPU dict entry, or a new
  safetensors file in the offload folder for disk-offloaded weights, written by transformers'
  ``offload_weight`` so that ``save_pretrained`` finds them);
* :func:`cpu_offloaded`: for a model held in memory, ``accelerate.cpu_offload`` on every decoder layer
  for the duration of a run (the weights are put back and the hooks removed afterwards);
* :func:`offload_device_map`: the ``device_map`` that keeps decoder layers on disk and everything
  else on one device, for loading a checkpoint memory-mapped;
* :func:`save_shard_size`: ``save_pretrained``'s shard size for such a model (transformers materialises
  each shard's offloaded weights at once, so the shard bounds the memory of saving).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

MIN_SHARD_BYTES = 2**30  # offloaded models save in shards of at least 1 GiB (a small model stays one file)


def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def offloaded_modules(module: nn.Module) -> list[nn.Module]:
    """Modules inside ``module`` (itself included) whose weights accelerate loads at each forward."""
    from accelerate.utils import has_offloaded_params

    return [m for m in module.modules() if has_offloaded_params(m)]


def execution_device(module: nn.Module) -> torch.device:
    """Device ``module`` computes on: an accelerate hook's execution device, else its first weight's device."""
    for m in module.modules():
        hook = _hook(m)
        device = getattr(hook, "execution_device", None)
        if device is not None and not isinstance(device, dict):
            return torch.device(device)
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[list[nn.Module]]:
    """Keep the offloaded weights of ``module`` materialised on its execution device within the block.

    Forwards inside the block run on these tensors (in-place changes included); on exit the hooks
    drop them again. Yields the hooked modules (for :func:`write_back_`); without offloaded weights
    this is a no-op that yields ``[]``.
    """
    from accelerate.utils import align_module_device

    hooked = offloaded_modules(module)
    with contextlib.ExitStack() as stack:
        for m in hooked:
            stack.enter_context(align_module_device(m))
        for m in hooked:
            _hook(m).offload = False  # no reload (and no drop) around each forward inside the block
        try:
            yield hooked
        finally:
            for m in hooked:
                _hook(m).offload = True


def write_back_(hooked: list[nn.Module], tensors: list[torch.Tensor]) -> int:
    """Store the current value of ``tensors`` (materialised within :func:`onloaded`, which yields
    ``hooked``) in the weights map of the hook that owns each. Returns how many were stored."""
    from accelerate.utils import named_module_tensors

    wanted = {id(t) for t in tensors}
    stored = 0
    for owner in hooked:
        hook = _hook(owner)
        for name, tensor in named_module_tensors(owner, include_buffers=False, recurse=hook.place_submodules):
            if id(tensor) in wanted:
                _store(hook.weights_map, name, tensor)
                stored += 1
    return stored


def _store(weights_map: Mapping[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """weights_map[name] = value, for accelerate's weight maps (dict, PrefixedDataset, OffloadedWeightsLoader)."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    key = name
    while isinstance(weights_map, PrefixedDataset):
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    value = value.detach()
    if isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict:
            _store_in_dict(weights_map.state_dict, key, value)
            return
        _store_on_disk(weights_map, key, value)
        return
    if not isinstance(weights_map, dict):
        raise ConfigError(f"cannot write pruned weights into a {type(weights_map).__name__} weights map")
    _store_in_dict(weights_map, key, value)


def _store_in_dict(state: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    held = state.get(key)
    if held is not None and held.data_ptr() == value.data_ptr() and held.device == value.device:
        return  # the hook materialised the stored tensor itself: already up to date
    state[key] = value.to(held.device if held is not None else "cpu")


def _store_on_disk(loader, key: str, value: torch.Tensor) -> None:
    """A new safetensors file in the loader's offload folder; the index entry points at it."""
    from transformers.integrations.accelerate import offload_weight

    if loader.save_folder is None:
        raise ConfigError(f"{key} is offloaded to disk but the model has no offload folder to write pruned "
                          "weights to; load it with offload_folder=... (e.g. pruning.io.load_model(..., offload=True))")
    offload_weight(value.to("cpu").contiguous(), key, loader.save_folder, loader.index)


@contextlib.contextmanager
def cpu_offloaded(layers: list[nn.Module], device: torch.device | None = None) -> Iterator[None]:
    """``accelerate.cpu_offload`` on each of ``layers`` (weights kept on CPU, each layer run on ``device``,
    None = where it is now) within the block; afterwards the (possibly pruned) weights are put back on
    their original devices and the hooks removed. Layers already carrying offload hooks are left as they are."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    plain = [layer for layer in layers if not offloaded_modules(layer)]
    states = []
    try:
        for layer in plain:
            devices = {n: t.device for n, t in layer.state_dict(keep_vars=True).items()}
            state = {n: t.detach().to("cpu") for n, t in layer.state_dict().items()}
            states.append((layer, devices, state))
            cpu_offload(layer, execution_device=device or execution_device(layer), state_dict=state)
        yield
    finally:
        for layer, devices, state in states:
            _restore_(layer, devices, state, remove_hook_from_module)


def _restore_(layer: nn.Module, devices: dict[str, torch.device], state: dict[str, torch.Tensor],
              remove_hook_from_module) -> None:
    from accelerate.utils import set_module_tensor_to_device

    remove_hook_from_module(layer, recurse=True)
    for name, device in devices.items():
        set_module_tensor_to_device(layer, name, device, value=state[name])


def offload_device_map(model: nn.Module, layers: nn.ModuleList, device: str | torch.device = "cpu",
                       layer_device: str = "disk") -> dict[str, str]:
    """A ``device_map`` (module name -> device) with every module of ``layers`` on ``layer_device``
    and everything else on ``device``; for ``from_pretrained(..., device_map=..., offload_folder=...)``.

    ``model`` may live on the meta device (built under ``accelerate.init_empty_weights``).
    """
    layer_ids = {id(layer) for layer in layers}
    holders = {id(m) for m in model.modules() if any(id(c) in layer_ids for c in m.modules())}
    device_map: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if id(child) in layer_ids:
                device_map[full] = layer_device
            elif id(child) in holders:
                visit(child, full + ".")
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                device_map[full] = str(device)
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            device_map[f"{prefix}{name}"] = str(device)

    visit(model, "")
    return device_map


def save_shard_size(model: nn.Module) -> int | None:
    """``max_shard_size`` for ``model.save_pretrained`` when weights are offloaded: the largest offloaded
    module (accelerate hooks each Linear), at least :data:`MIN_SHARD_BYTES`, so saving holds one shard in
    memory instead of every offloaded weight of a default 50 GB shard. None when nothing is offloaded."""
    sizes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in offloaded_modules(model)]
    return max(MIN_SHARD_BYTES, *sizes) if sizes else None
