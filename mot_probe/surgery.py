"""MoT probe surgery: duplicate each decoder block's QKV and FFN projections (in general: every
projection structural discovery finds, except the token mixer's output projection) and its fused MoE
experts (the router stays shared) into a text and a visual path, prune one path with a chosen calibration
pool, and undo it all.

In-place and reversible, like peft's adapters::

    probe = attach_probe_(model)                       # routed, still computes exactly the original
    probe.prune_path_("text", WandaConfig(sparsity=0.5, pool="visual"), batches)
    ...evaluate model...
    probe.reset_()                                     # both paths dense again (copies dropped)
    probe.unload()                                     # original modules back, original state_dict keys

The probe's adapter (``probe.adapter``) is the family's adapter, except that the Linears and experts it hands to the
pruning engine are the routed ones (seen as their active path) and every replayed layer is routed with the batch's
modality mask; it is passed to the engine as an argument (``prune_(model, config, batches, adapter=probe.adapter)``),
nothing is stored on the model but the routed modules and two forward hooks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from pruning.adapters import (
    ATTN_PROJ,
    DECODER_PROJ,
    MLP_PROJ,
    Adapter,
    BlockProjections,
    CapturedBatch,
    get_adapter,
)
from pruning.config import MethodConfig, PruneConfig
from pruning.engine import PruneReport, prune_
from pruning.errors import ConfigError, ToolkitError
from pruning.experts import EXPERT_PARAMS, block_targets, find_experts

from .experts import PathExperts, RoutedExperts, route_experts, routing_problem
from .routing import ModalityRouter, RoutedLinear, RoutedModule, check_path

log = logging.getLogger(__name__)

# The paper's probe routes Q, K, V and the FFN; o_proj is shared unless asked for. These are the routed
# names of a Llama-style block; other blocks route their discovered projections (see routing_plan).
ROUTED = ATTN_PROJ[:3] + MLP_PROJ
# Last name parts of a token mixer's output projection (attention, linear attention, conv mixers).
_MIXER_OUTPUTS = ("o_proj", "out_proj", "dense", "wo", "c_proj")
# Probe pool names -> engine pool names ("mixed" = every non-padding token).
PROBE_POOLS = {"text": "text", "visual": "visual", "mixed": "all"}
# id(model) -> its probe, for get_probe; held weakly (a probe lives as long as its model's routing hooks hold it, or
# its user), so the model carries no reference the import graph cannot show.
_PROBES: "weakref.WeakValueDictionary[int, MoTProbe]" = weakref.WeakValueDictionary()


class ProbeError(ToolkitError):
    """The model carries no probe, or already carries one."""


def probe_pool(name: str) -> str:
    """The engine's calibration pool of a probe pool.

    Args:
        name: the probe's name for the pool: 'text', 'visual' or 'mixed'.

    Returns:
        The engine's pool name ('text', 'visual' or 'all').

    Raises:
        ConfigError: ``name`` is not a probe pool.
    """
    if name not in PROBE_POOLS:
        raise ConfigError(f"unknown probe pool {name!r}; choose one of {list(PROBE_POOLS)}")
    return PROBE_POOLS[name]


class ProbeAdapter(Adapter):
    """What a probe changes in its family's adapter: the Linears and experts it hands the pruning engine are the
    routed ones (seen as their active path), and every replayed layer is routed with the batch's modality mask.

    Not used alone: a probe's adapter is an instance of a class made from this one and the family adapter's class
    (:func:`probe_adapter`), so every other method, present or added later (``capture`` with its replay check on a
    structurally discovered family, ``after_layer``, ...), is the family's own and calls these overrides through
    ``self``. Overrides: ``name``, :meth:`projections`, :meth:`replay`.
    """

    def __init__(self, probe: "MoTProbe", prunes_experts: bool):
        super().__init__()
        self.probe = probe
        self.prunes_experts = prunes_experts  # False when the experts stay shared: a path's pruning leaves them alone

    def projections(self, model: nn.Module, index: int) -> BlockProjections:
        """The routed projections of layer ``index``: what the engine prunes by default on a probed model."""
        return BlockProjections(tuple(self.probe.routed[index]), self.probe.skipped[index])

    def replay(self, model: nn.Module, index: int, hidden: torch.Tensor, batch: CapturedBatch,
               layer: nn.Module | None = None) -> torch.Tensor:
        with self.probe.router.route(batch.visual):
            return super().replay(model, index, hidden, batch, layer)


@functools.lru_cache(maxsize=None)
def _probe_adapter_class(family: type[Adapter]) -> type[ProbeAdapter]:
    return type(f"{family.__name__}WithProbe", (ProbeAdapter, family),
                {"name": f"{family.name}+mot", "__doc__": f"{family.__name__} with the MoT probe's routing."})


def probe_adapter(family: Adapter, probe: "MoTProbe", prunes_experts: bool) -> ProbeAdapter:
    """The adapter of ``probe``'s model: an instance of ``family``'s class with :class:`ProbeAdapter`'s overrides
    (a fresh instance: what the family adapter caches per model, such as a checked replay, is checked again with
    routing)."""
    return _probe_adapter_class(type(family))(probe, prunes_experts)


class MoTProbe:
    """A model whose decoder projections are routed by modality. Create with :func:`attach_probe_`.

    ``routed[i]`` maps the routed projections of decoder layer ``i`` (names relative to the block) to
    their RoutedLinear, ``experts[i]`` its fused MoE experts modules to their RoutedExperts; ``skipped[i]``
    maps what the probe leaves shared to why (the attention output projection unless ``include_o_proj``,
    MoE routers, and the experts when ``allow_shared_experts``). ``adapter`` is the family's adapter with the
    routed replay: pass it as ``adapter=`` to what replays the decoder layers (``prune_``, ``compute_masks``).

    Args:
        model: the model to route, in place.
        include_o_proj: route the attention output projection too (by default it stays shared).
        allow_shared_experts: keep fused MoE experts shared instead of refusing a layout that cannot be routed.

    Raises:
        ProbeError: the model already carries a probe, or a layer's experts cannot be routed.
    """

    def __init__(self, model: nn.Module, include_o_proj: bool = False, allow_shared_experts: bool = False):
        if _find_probe(model) is not None:
            raise ProbeError(f"{type(model).__name__} already carries a probe; unload() it first")
        self.model = model
        self.family = get_adapter(model)
        plan = routing_plan(model, self.family, include_o_proj)  # checks everything before any surgery
        experts = _shared_experts(model, self.family) if allow_shared_experts else expert_plan(model, self.family)
        self.skipped = [{n: why for n, why in skipped.items() if n not in routed}
                        for (_, skipped), routed in zip(plan, experts)]
        self.layer_names = [(*names, *_param_names(routed)) for (names, _), routed in zip(plan, experts)]
        self.names = tuple(dict.fromkeys(name for names in self.layer_names for name in names))
        self.router = ModalityRouter()
        self.routed: list[dict[str, RoutedLinear]] = []
        self.experts: list[dict[str, RoutedExperts]] = []
        for layer, (names, _), routed in zip(self.family.decoder_layers(model), plan, experts):
            self.routed.append({name: self._wrap(layer, name, RoutedLinear) for name in names})
            owners = self.family.modality_experts(routed)
            self.experts.append({name: self._wrap(layer, name, _experts_wrapper(owners.get(name)))
                                 for name in routed})
        self._hooks = [model.register_forward_pre_hook(self._set_mask, with_kwargs=True),
                       model.register_forward_hook(self._clear_mask, always_call=True)]
        self.adapter = probe_adapter(self.family, self, prunes_experts=not allow_shared_experts)
        _PROBES[id(model)] = self

    def _wrap(self, layer: nn.Module, name: str,
              kind: Callable[[nn.Module, ModalityRouter], RoutedModule]) -> RoutedModule:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name)
        routed = kind(getattr(parent, child), self.router)
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

    def routed_experts(self) -> Iterable[RoutedExperts]:
        for layer in self.experts:
            yield from layer.values()

    def routed_modules(self) -> Iterable[RoutedModule]:
        """Every routed Linear, then every routed experts module."""
        yield from self.routed_linears()
        yield from self.routed_experts()

    def path_parameters(self, path: str) -> list[torch.Tensor]:
        """The weights (and biases, expert tensors) that serve ``path`` now: its own copies or the shared base."""
        check_path(path)
        return [p for r in self.routed_modules() for p in r.path(path).parameters()]

    def extra_parameters(self) -> int:
        """Number of weight entries held beyond the original model (the materialised copies)."""
        return sum(p.numel() for r in self.routed_modules() for copy in r.paths.values() for p in copy.parameters())

    def prune_path_(self, path: str, config: MethodConfig | PruneConfig,
                    calibration: Iterable[Mapping[str, Any]] = (), *, progress: bool = True,
                    keep_masks: bool = False) -> PruneReport:
        """Prune path ``path`` of the routed Linears and experts with ``config`` (its pool is independent of the
        path: e.g. the text path calibrated with visual tokens); the other path stays dense.

        ``config.targets`` defaults to every routed projection and routed expert; naming one that is not
        routed is an error. A path's experts are pruned per expert and per row, each expert with statistics
        from the pooled tokens the (shared) router sent to it; experts that saw none are pruned by magnitude
        and listed in the report (``LayerReport.experts``), as on a plain model.
        """
        check_path(path)
        config = self._path_config(config)
        layers = range(len(self.routed)) if config.layers is None else config.layers
        try:
            for i in layers:
                if 0 <= i < len(self.routed):
                    for experts in self.experts[i].values():
                        experts.active = path  # a pathway's own expert set (PathExperts) is a target only now
                    self._activate(i, path, config.targets)
            return prune_(self.model, config, calibration, progress=progress, keep_masks=keep_masks,
                          adapter=self.adapter)
        except BaseException:
            self.reset_(path)  # nothing half-pruned stays behind
            raise

    def _activate(self, index: int, path: str, targets: tuple[str, ...]) -> None:
        """Give path ``path`` its own copy of what the engine will prune in layer ``index`` and expose it."""
        linears, experts = block_targets(self.adapter, self.model, index, targets)
        for module in (*linears.values(), *experts.modules.values()):
            if isinstance(module, RoutedModule):
                module.materialise_(path)
                module.active = path

    def _path_config(self, config: MethodConfig | PruneConfig) -> MethodConfig | PruneConfig:
        """The default targets mean every routed projection and routed expert parameter (per layer: layers may
        differ, e.g. hybrid, KV-sharing or partly-MoE decoders); they are spelled out when every layer routes
        the same names."""
        if tuple(config.targets) == DECODER_PROJ:
            same = all(names == self.names for names in self.layer_names)
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
        for routed in self.routed_modules():
            routed.reset_(path)

    def unload(self, keep: str = "text") -> nn.Module:
        """Replace every routed Linear and experts module by path ``keep``'s module (of the original type);
        remove the routing hooks.

        An unpruned probe gives back the original modules (same objects, same state_dict keys).
        """
        check_path(keep)
        for layer, routed, experts in zip(self.family.decoder_layers(self.model), self.routed, self.experts):
            for name, module in {**routed, **experts}.items():
                parent_name, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent_name), child, module.path(keep))
        for hook in self._hooks:
            hook.remove()
        if _PROBES.get(id(self.model)) is self:
            del _PROBES[id(self.model)]
        self.routed, self.experts = [], []
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
    return plan


def _experts_wrapper(owner: str | None) -> Callable[[nn.Module, ModalityRouter], RoutedModule]:
    """route_experts, or for an expert set that reads one pathway's tokens only, a PathExperts of that pathway."""
    if owner is None:
        return route_experts
    return lambda base, router: PathExperts(base, router, owner)


def expert_plan(model: nn.Module, family: Adapter) -> list[tuple[str, ...]]:
    """Per decoder layer: its fused MoE experts modules (names relative to the block), all routable (or given to
    one pathway by ``family.modality_experts``).

    Raises ProbeError naming the layer, the module and its layout when one cannot be routed per modality."""
    plan = []
    for i, layer in enumerate(family.decoder_layers(model)):
        experts = find_experts(layer)
        owned = family.modality_experts(experts)
        for name, module in experts.items():
            problem = None if name in owned else routing_problem(name, module)
            if problem:
                raise ProbeError(
                    f"{type(model).__name__}: cannot route the experts {name!r} of decoder layer {i} per modality: "
                    f"{problem}. Pass allow_shared_experts=True to keep them shared (not routed, not pruned)")
        plan.append(tuple(experts))
    return plan


def unroutable_experts(model: nn.Module) -> dict[str, str]:
    """'<layer index>.<name>' -> why, for every fused experts module of ``model`` the probe cannot route."""
    family = get_adapter(model)
    return {f"{i}.{name}": problem for i, layer in enumerate(family.decoder_layers(model))
            for name, module in find_experts(layer).items()
            if name not in family.modality_experts([name]) and (problem := routing_problem(name, module))}


def _shared_experts(model: nn.Module, family: Adapter) -> list[tuple[str, ...]]:
    """allow_shared_experts: nothing routed; say which expert weights stay shared."""
    layers = family.decoder_layers(model)
    shared = [f"{i}.{name}" for i, layer in enumerate(layers) for name in find_experts(layer)]
    if shared:
        log.warning("MoT probe: MoE expert weights stay shared (not routed, not pruned): %s", shared)
    return [()] * len(layers)


def _param_names(experts: tuple[str, ...]) -> tuple[str, ...]:
    """The pruning targets of routed experts modules: their fused parameters (``mlp.experts.gate_up_proj``)."""
    return tuple(f"{name}.{param}" for name in experts for param in EXPERT_PARAMS)


def attach_probe_(model: nn.Module, include_o_proj: bool = False, allow_shared_experts: bool = False) -> MoTProbe:
    """Route the decoder projections of ``model`` by modality, in place. Returns the probe handle.

    On a mixture-of-experts model the fused experts are routed too: the router stays shared and each token
    is computed by its own modality's copy of the experts it was routed to. Expert layouts that cannot be
    routed are refused (ProbeError naming the layer, the module and the layout);
    ``allow_shared_experts=True`` keeps the experts shared instead (not routed, so a path's pruning leaves
    them alone) and routes the other projections (attention, shared experts).

    Args:
        model: a vision-language model (its decoder found by :func:`pruning.adapters.get_adapter`).
        include_o_proj: route the attention output projection too.
        allow_shared_experts: keep fused MoE experts shared instead of refusing a layout that cannot be routed.

    Returns:
        The probe: prune a path with ``prune_path_``, go back to dense with ``reset_``, and ``unload`` it.

    Raises:
        ProbeError: the model already carries a probe, or its experts cannot be routed.
    """
    return MoTProbe(model, include_o_proj, allow_shared_experts)


def _find_probe(model: nn.Module) -> MoTProbe | None:
    probe = _PROBES.get(id(model))
    return probe if probe is not None and probe.model is model else None


def get_probe(model: nn.Module) -> MoTProbe:
    """The probe attached to ``model``.

    Args:
        model: a model routed by :func:`attach_probe_`.

    Returns:
        Its probe.

    Raises:
        ProbeError: the model carries no probe.
    """
    probe = _find_probe(model)
    if probe is None:
        raise ProbeError(f"{type(model).__name__} carries no MoT probe; call attach_probe_(model) first")
    return probe
