"""MoT probe surgery: duplicate each decoder block's QKV and FFN projections (in general: every
projection structural discovery finds, except the token mixer's output projection) into a text and a
visual path, prune one path with a chosen calibration pool, and undo it all.

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

from pruning.adapters import (
    ATTACHED_ADAPTER,
    ATTN_PROJ,
    DECODER_PROJ,
    MLP_PROJ,
    Adapter,
    BlockProjections,
    CapturedBatch,
    get_adapter,
)
from pruning.config import PruneConfig
from pruning.engine import PruneReport, prune_
from pruning.errors import ConfigError, ToolkitError
from pruning.experts import find_experts

from .routing import ModalityRouter, RoutedLinear, check_path

log = logging.getLogger(__name__)

# The paper's probe routes Q, K, V and the FFN; o_proj is shared unless asked for. These are the routed
# names of a Llama-style block; other blocks route their discovered projections (see routing_plan).
ROUTED = ATTN_PROJ[:3] + MLP_PROJ
# Last name parts of a token mixer's output projection (attention, linear attention, conv mixers).
_MIXER_OUTPUTS = ("o_proj", "out_proj", "dense", "wo", "c_proj")
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

    prunes_experts = False  # experts are not routed: a path's pruning must leave them (shared) alone

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

    def visual_mask_of(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        return self.inner.visual_mask_of(model, inputs)

    def projections(self, model: nn.Module, index: int) -> BlockProjections:
        """The routed projections of layer ``index``: what the engine prunes by default on a probed model."""
        return BlockProjections(tuple(self.probe.routed[index]), self.probe.skipped[index])

    def record_extras(self, model, extras):
        return self.inner.record_extras(model, extras)

    def after_layer(self, model, index, hidden, extras):
        return self.inner.after_layer(model, index, hidden, extras)

    def replay(self, model: nn.Module, index: int, hidden: torch.Tensor, batch: CapturedBatch,
               layer: nn.Module | None = None) -> torch.Tensor:
        with self.probe.router.route(batch.visual):
            return self.inner.replay(model, index, hidden, batch, layer)


class MoTProbe:
    """A model whose decoder projections are routed by modality. Create with :func:`attach_probe_`.

    ``routed[i]`` maps the routed projections of decoder layer ``i`` (names relative to the block) to
    their RoutedLinear; ``skipped[i]`` maps what the probe leaves shared to why (the attention output
    projection unless ``include_o_proj``, MoE routers and experts).
    """

    def __init__(self, model: nn.Module, include_o_proj: bool = False, allow_shared_experts: bool = False):
        if getattr(model, ATTACHED_ADAPTER, None) is not None:
            raise ProbeError(f"{type(model).__name__} already carries a probe; unload() it first")
        self.model = model
        self.family = get_adapter(model)
        plan = routing_plan(model, self.family, include_o_proj)  # checks everything before any surgery
        self.names = tuple(dict.fromkeys(name for names, _ in plan for name in names))
        self.skipped = [skipped for _, skipped in plan]
        if not allow_shared_experts:
            _refuse_experts(model, self.family)
        self.router = ModalityRouter()
        self.routed: list[dict[str, RoutedLinear]] = []
        for layer, (names, _) in zip(self.family.decoder_layers(model), plan):
            self.routed.append({name: self._wrap(layer, name) for name in names})
        self._hooks = [model.register_forward_pre_hook(self._set_mask, with_kwargs=True),
                       model.register_forward_hook(self._clear_mask, always_call=True)]
        setattr(model, ATTACHED_ADAPTER, ProbeAdapter(self.family, self))

    def _wrap(self, layer: nn.Module, name: str) -> RoutedLinear:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name)
        routed = RoutedLinear(getattr(parent, child), self.router)
        setattr(parent, child, routed)
        return routed

    # -- routing from the model's own forward ------------------------------------------------
    def _set_mask(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = {**kwargs, "input_ids": input_ids}
        self.router.visual = None if input_ids is None else self.family.visual_mask_of(model, inputs)

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
                names = self.routed[i] if tuple(config.targets) == DECODER_PROJ else config.targets
                for name in names:
                    self.routed[i][name].materialise_(path)
                    self.routed[i][name].active = path
        try:
            return prune_(self.model, config, calibration, progress=progress, keep_masks=keep_masks)
        except BaseException:
            self.reset_(path)  # nothing half-pruned stays behind
            raise

    def _path_config(self, config: PruneConfig) -> PruneConfig:
        """The default targets mean every routed projection (per layer: layers may differ, e.g. hybrid
        or KV-sharing decoders); they are spelled out when every layer routes the same names."""
        if tuple(config.targets) == DECODER_PROJ:
            same = all(tuple(routed) == self.names for routed in self.routed)
            return dataclasses.replace(config, targets=self.names) if same else config
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
            routed.reset_(path)

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


def is_attention_output(name: str) -> bool:
    """True for a token mixer's output projection (``self_attn.o_proj``, ``linear_attn.out_proj``, ...),
    which the paper's probe leaves shared."""
    parent, _, last = name.rpartition(".")
    in_ffn = any(word in parent for word in ("mlp", "feed_forward", "ffn"))
    return last in _MIXER_OUTPUTS and not in_ffn


def routing_plan(model: nn.Module, family: Adapter,
                 include_o_proj: bool) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    """Per decoder layer: (projections to route, what stays shared -> why).

    Raises ProbeError naming the obstacle when a projection cannot be routed (not an nn.Linear) or
    when no layer has anything to route.
    """
    plan = []
    for i, layer in enumerate(family.decoder_layers(model)):
        found = family.projections(model, i)
        skipped = dict(found.skipped)
        names = []
        for name in found.names:
            if not include_o_proj and is_attention_output(name):
                skipped[name] = "attention output projection (shared; include_o_proj=True routes it)"
                continue
            module = layer.get_submodule(name)
            if isinstance(module, RoutedLinear) or not isinstance(module, nn.Linear):
                raise ProbeError(f"cannot route {name} of decoder layer {i} of {type(model).__name__}: it is a "
                                 f"{type(module).__name__}, not an nn.Linear; the probe wraps plain Linears only")
            names.append(name)
        plan.append((tuple(names), skipped))
    if not any(names for names, _ in plan):
        raise ProbeError(f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}): "
                         "no decoder projection can be routed; nothing would be probed")
    experts = sorted({name for _, skipped in plan for name, why in skipped.items() if "expert" in why.lower()})
    if experts:
        log.warning("MoT probe: MoE expert weights stay shared (not routed, not pruned): %s", experts)
    return plan


def _refuse_experts(model: nn.Module, family: Adapter) -> None:
    """The probe routes nn.Linear projections only; fused MoE experts (3-D weights) cannot be routed yet."""
    for i, layer in enumerate(family.decoder_layers(model)):
        experts = find_experts(layer)
        if experts:
            raise ProbeError(
                f"{type(model).__name__}: decoder layer {i} holds mixture-of-experts weights ({', '.join(experts)}: "
                "3-D per-expert parameters, not nn.Linear projections); the MoT probe cannot route experts per "
                "modality yet. Prune MoE models with pruning.prune_ (which does prune the experts), or pass "
                "allow_shared_experts=True to route only the other projections")


def attach_probe_(model: nn.Module, include_o_proj: bool = False, allow_shared_experts: bool = False) -> MoTProbe:
    """Route the decoder projections of ``model`` by modality, in place. Returns the probe handle.

    A mixture-of-experts model is refused: its experts (3-D weights) cannot be routed per modality yet, so
    a path would differ from the other only outside the experts. ``allow_shared_experts=True`` routes the
    other projections anyway (attention, shared experts) and keeps the experts shared."""
    return MoTProbe(model, include_o_proj, allow_shared_experts)


def get_probe(model: nn.Module) -> MoTProbe:
    """The probe attached to ``model``; ProbeError when there is none."""
    adapter = getattr(model, ATTACHED_ADAPTER, None)
    if not isinstance(adapter, ProbeAdapter):
        raise ProbeError(f"{type(model).__name__} carries no MoT probe; call attach_probe_(model) first")
    return adapter.probe
