"""Layer-wise replay of captured calibration batches: the one capture -> replay loop.

A batch is captured once at the input of decoder layer 0 (:meth:`Adapter.capture`); each decoder
layer is then re-run on its captured keyword arguments, which is bitwise what the model computes.
The pruning engine (layer-major, all batches per layer) and the analyses (batch-major, one batch
through all layers) both iterate with :func:`replay_layers`::

    batch = capture(model, adapter, inputs)
    for step in replay_layers(model, adapter, [batch], range(4)):
        print(step.index, drift(step.inputs, step.outputs).mean())
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .adapters import Adapter, CapturedBatch, map_tensors
from .errors import ConfigError
from .offload import execution_device


class LayerIO(NamedTuple):
    index: int               # decoder layer index
    inputs: torch.Tensor     # (B, T, C) the layer's input hidden states, on its execution device
    outputs: torch.Tensor    # (B, T, C) its outputs, same device
    batch: CapturedBatch     # the captured batch on that device (masks, kwargs)


def check_layers(layers: Iterable[int], n_layers: int) -> list[int]:
    """Sorted distinct decoder layer indices; ConfigError when empty or out of ``range(n_layers)``."""
    layers = sorted({int(i) for i in layers})
    if not layers:
        raise ConfigError("layers is empty: name at least one decoder layer index, e.g. layers=(0,)")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has {n_layers} decoder layers")
    return layers


def capture(model: nn.Module, adapter: Adapter, inputs: Mapping[str, Any]) -> CapturedBatch:
    """One batch of model inputs captured at the input of decoder layer 0 (inputs moved to the embeddings' device)."""
    device = execution_device(model.get_input_embeddings())
    return adapter.capture(model, map_tensors(dict(inputs), lambda t: t.to(device)))


def on_device(batch: CapturedBatch, device: torch.device) -> CapturedBatch:
    """``batch`` on ``device``; captured batches live on one device, so no copy when it is that one."""
    return batch if batch.hidden.device == device else batch.to(device)


def replay_layers(model: nn.Module, adapter: Adapter, captured: Sequence[CapturedBatch], indices: Iterable[int],
                  *, chain: bool = True) -> Iterator[LayerIO]:
    """Run decoder layers ``indices`` (in order, consecutive) on every captured batch, layer by layer.

    Yields one :class:`LayerIO` per (layer, batch). With ``chain`` each batch's ``hidden`` becomes the
    layer's outputs after its step (kept on the batch's own device), so the next index sees them; without
    it the batches are left as they are (e.g. a dense pass whose outputs are not propagated).
    """
    layers = adapter.decoder_layers(model)
    handed_on = adapter.handed_on(model)
    for index in indices:
        device = execution_device(layers[index])
        for batch in captured:
            moved = on_device(batch, device)
            outputs = adapter.replay(model, index, moved.hidden, moved)
            if moved is not batch and handed_on:
                _keep_handed_on(moved, batch, index, handed_on)
            yield LayerIO(index, moved.hidden, outputs, moved)
            if chain:
                batch.hidden = outputs.to(batch.hidden.device)


def _keep_handed_on(moved: CapturedBatch, batch: CapturedBatch, index: int, names: Sequence[str]) -> None:
    """The arguments the replay of layer ``index`` wrote for the layers after it in the device copy ``moved``, kept
    in ``batch`` (on its device)."""
    device, memo = batch.hidden.device, {}
    for later in range(index + 1, len(batch.layer_kwargs)):
        for name in names:
            if name in moved.layer_kwargs[later]:
                value = moved.layer_kwargs[later][name]
                batch.layer_kwargs[later][name] = map_tensors(value, lambda t: t.to(device), memo)


def propagate_(model: nn.Module, adapter: Adapter, captured: Sequence[CapturedBatch], indices: Iterable[int]) -> None:
    """Advance every captured batch through decoder layers ``indices`` (in place)."""
    for _ in replay_layers(model, adapter, captured, indices):
        pass
