"""MoT probe surgery: duplicate each decoder block's QKV and FFN projections into a text and a visual
path, prune one path with a chosen calibration pool, and undo it all.

In-place and reversible, like peft's adapters::

    probe = attach_probe_(model)                       # routed, still computes exactly the original
    probe.prune_path_("text", PruneConfig("wanda", sparsity=0.5, pool="visual"), batches)
    ...evaluate model...
    probe.reset_()                                     # both paths dense again (copies dropped)
    probe.unload()                                     # plain nn.Linears back, original state_dict keys

The probe attaches its own adapter to the model (``pruning.adapters.ATTACHED_ADAPTER``): it behaves as
the family's adapter, except that the Linears it hands to the pruning engine are the routed ones
(seen as their active path) and every replayed layer is routed with the batch's modality mask.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from pruning.adapters import ATTACHED_ADAPTER, ATTN_PROJ, DECODER_PROJ, MLP_PROJ, Adapter, CapturedBatch, get_adapter
from pruning.config import PruneConfig
from pruning.engine import PruneReport, prune_
from pruning.errors import ConfigError, ToolkitError
from pruning.experts import find_experts

from .routing import ModalityRouter, RoutedLinear, check_path

log = logging.getLogger(__name__)

# The paper's probe routes Q, K, V and the FFN; o_proj is shared unless asked for.
ROUTED = ATTN_PROJ[:3] + MLP_PROJ
# Probe pool names -> engine pool names ("mixed" = every non-padding token).
PROBE_POOLS = {"text": "text", "visual": "visual", "mixed": "all"}


class ProbeError(ToolkitError):
    """The model carries no probe, or already carries one."""


def probe_pool(name: str) -> str:
    """'text' | 'visual' | 'mixed' -> the engine's pool name."""
    if name not in PROBE_POOLS:
        raise ConfigError(f"unknown probe pool {name!r}; choose one of {list(PROBE_POOLS)}")
    return PROBE_POOLS[name]


class ProbeAdapter(Adapter):
    """The family adapter of a probed model, with routing."""

    def __init__(self, inner: Adapter, probe: "MoTProbe"):
        self.inner, self.probe = inner, probe
        self.name = f"{inner.name}+mot"

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.inner.language_model(model)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.inner.decoder_layers(model)

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return self.inner.visual_token_ids(model)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return self.inner.attention_module(layer)

    def record_extras(self, model, extras):
        return self.inner.record_extras(model, extras)

    def after_layer(self, model, index, hidden, extras):
        return self.inner.after_layer(model, index, hidden, extras)

    def replay(self, model: nn.Module, index: int, hidden: torch.Tensor, batch: CapturedBatch,
               layer: nn.Module | None = None) -> torch.Tensor:
        with self.probe.router.route(batch.visual):
            return self.inner.replay(model, index, hidden, batch, layer)


class MoTProbe:
    """A model whose decoder projections are routed by modality. Create with :func:`attach_probe_`."""

    def __init__(self, model: nn.Module, include_o_proj: bool = False):
        if getattr(model, ATTACHED_ADAPTER, None) is not None:
            raise ProbeError(f"{type(model).__name__} already carries a probe; unload() it first")
        self.model = model
        self.family = get_adapter(model)
        _refuse_experts(model, self.family)
        self.names = ROUTED + (("self_attn.o_proj",) if include_o_proj else ())
        self.router = ModalityRouter()
        self.routed: list[dict[str, RoutedLinear]] = []
        for layer in self.family.decoder_layers(model):
            self.routed.append({name: self._wrap(layer, name) for name in self.names})
        self._hooks = [model.register_forward_pre_hook(self._set_mask, with_kwargs=True),
                       model.register_forward_hook(self._clear_mask, always_call=True)]
        setattr(model, ATTACHED_ADAPTER, ProbeAdapter(self.family, self))

    def _wrap(self, layer: nn.Module, name: str) -> RoutedLinear:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise ProbeError(f"{name} is a {type(base).__name__}, not an nn.Linear; cannot route it")
        routed = RoutedLinear(base, self.router)
        setattr(parent, child, routed)
        return routed

    # -- routing from the model's own forward ------------------------------------------------
    def _set_mask(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.router.visual = None if input_ids is None else self.family.visual_mask(model, input_ids)

    def _clear_mask(self, *_: Any) -> None:
        self.router.visual = None

    # -- paths -------------------------------------------------------------------------------
    def routed_linears(self) -> Iterable[RoutedLinear]:
        for layer in self.routed:
            yield from layer.values()

    def path_parameters(self, path: str) -> list[torch.Tensor]:
        """The weights (and biases) that serve ``path`` now: its own copies or the shared base."""
        check_path(path)
        return [p for r in self.routed_linears() for p in r.path(path).parameters()]

    def extra_parameters(self) -> int:
        """Number of weight entries held beyond the original model (the materialised copies)."""
        return sum(p.numel() for r in self.routed_linears() for copy in r.paths.values() for p in copy.parameters())

    def prune_path_(self, path: str, config: PruneConfig, calibration: Iterable[Mapping[str, Any]] = (), *,
                    progress: bool = True, keep_masks: bool = False) -> PruneReport:
        """Prune path ``path`` of the routed Linears with ``config`` (its pool is independent of the
        path: e.g. the text path calibrated with visual tokens); the other path stays dense.

        ``config.targets`` defaults to every routed projection; naming one that is not routed is an error.
        """
        check_path(path)
        config = self._path_config(config)
        layers = range(len(self.routed)) if config.layers is None else config.layers
        for i in layers:
            if 0 <= i < len(self.routed):
                for name in config.targets:
                    self.routed[i][name].materialise(path)
                    self.routed[i][name].active = path
        try:
            return prune_(self.model, config, calibration, progress=progress, keep_masks=keep_masks)
        except BaseException:
            self.reset_(path)  # nothing half-pruned stays behind
            raise

    def _path_config(self, config: PruneConfig) -> PruneConfig:
        if tuple(config.targets) == DECODER_PROJ:
            return dataclasses.replace(config, targets=self.names)
        stray = [t for t in config.targets if t not in self.names]
        if stray:
            raise ConfigError(f"targets {stray} are not routed by this probe (routed: {list(self.names)}); "
                              "attach the probe with include_o_proj=True to route o_proj")
        return config

    def reset_(self, path: str | None = None) -> None:
        """Make ``path`` (both when None) dense again by dropping its copies."""
        if path is not None:
            check_path(path)
        for routed in self.routed_linears():
            routed.reset(path)

    def unload(self, keep: str = "text") -> nn.Module:
        """Replace every routed Linear by path ``keep``'s Linear; remove hooks and the attached adapter.

        An unpruned probe gives back the original modules (same objects, same state_dict keys).
        """
        check_path(keep)
        for layer, routed in zip(self.family.decoder_layers(self.model), self.routed):
            for name, module in routed.items():
                parent_name, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent_name), child, module.path(keep))
        for hook in self._hooks:
            hook.remove()
        delattr(self.model, ATTACHED_ADAPTER)
        self.routed = []
        return self.model


def _refuse_experts(model: nn.Module, family: Adapter) -> None:
    """The probe routes nn.Linear projections only; fused MoE experts (3-D weights) cannot be routed yet."""
    for i, layer in enumerate(family.decoder_layers(model)):
        experts = find_experts(layer)
        if experts:
            raise ProbeError(
                f"{type(model).__name__}: decoder layer {i} holds mixture-of-experts weights ({', '.join(experts)}: "
                "3-D per-expert parameters, not nn.Linear projections); the MoT probe cannot route experts per "
                "modality yet. Prune MoE models with pruning.prune_ (which does prune the experts)")


def attach_probe_(model: nn.Module, include_o_proj: bool = False) -> MoTProbe:
    """Route the decoder projections of ``model`` by modality, in place. Returns the probe handle."""
    return MoTProbe(model, include_o_proj)


def get_probe(model: nn.Module) -> MoTProbe:
    """The probe attached to ``model``; ProbeError when there is none."""
    adapter = getattr(model, ATTACHED_ADAPTER, None)
    if not isinstance(adapter, ProbeAdapter):
        raise ProbeError(f"{type(model).__name__} carries no MoT probe; call attach_probe_(model) first")
    return adapter.probe
