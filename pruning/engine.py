"""The layer-wise pruning engine: orchestration only (hooks, the layer loop, offloading).

Schedule per decoder layer (two forward passes of the layer):

1. *dense pass*: replay the unpruned layer on every calibration batch with pre-hooks on the target
   Linears; the same pass gives each token's drift (ATV) and the pooled activations feed the
   statistics; a layer whose pool selected no token is refused here, before any of its weights change
   (zero statistics tie every score), one with fewer pooled tokens than its narrowest target input is flagged;
2. masks from statistics (pure functions in scores/masks/sparsegpt), applied to the weights;
3. *pruned pass*: replay the pruned layer to produce the next layer's inputs (or keep the dense
   outputs with ``propagate='dense'``).

A non-uniform ``allocation`` (:mod:`pruning.allocation`) is planned before the layer loop: ``owl`` first runs
one dense pass of the decoder over the calibration batches (every non-padding token; the Wanda scores'
outlier ratio of each layer needs all layers before the first is pruned, as llm-compressor does), ``map``
reads a sensitivity map; each target then prunes the exact count the plan gives it.

ATV's alpha rule needs the mean drift of all samples before any sample's pool is known; the
engine then either stashes the activations of the dense pass (``ExecutionConfig(schedule='two-pass')``) or runs one
extra drift-only pass (``'three-pass'``, the reference schedule); both give identical masks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, CapturedBatch, get_adapter, map_tensors, tokens_align
from .allocation import Allocation, allocate, map_units, outlier_ratio, owl_units, read_sensitivity_map
from .config import MethodConfig, PruneConfig, method_config
from .errors import CalibrationError, ConfigError, ToolkitError, UnsupportedModelError, forward_failed
from .execution import ExecutionConfig
from .experts import ROUTED, block_targets, check_config, eager_experts
from .masks import apply_mask_, sparsity_of
from .memory import stash_fits
from .offload import cpu_offloaded, execution_device, onloaded, write_back_
from .pools import drift
from .registry import get_pool, get_scorer
from .replay import capture, check_layers, on_device, propagate_, replay_layers
from .scores import wanda_scores
from .stats import ACCUMULATORS, Hessian, SquaredNorms

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    sparsity: dict[str, float]        # per Linear: fraction of zero weights (mask fraction if not applied)
    text_tokens: int = 0              # text tokens seen (non-padding)
    visual_tokens: int = 0            # visual tokens seen
    pooled_tokens: int = 0            # tokens that fed the statistics
    visual_selected: int = 0          # visual tokens in the pool
    k_per_sample: list[int] = field(default_factory=list)  # ATV / random-visual
    mean_drift: float | None = None   # mean visual-token drift at this layer
    seconds: float = 0.0
    experts: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # MoE: experts module -> pooled_tokens,
    #                                   routed_tokens (per expert) and unrouted (experts pruned by magnitude)
    memory_inputs: list[str] = field(default_factory=list)  # Linears reading another sequence than the tokens
    #                                   (cross-attention memory, e.g. Mllama's image K/V): all their rows pooled
    thin_pool: bool = False           # pooled_tokens < the narrowest input of the layer's targets: every target's
    #                                   statistic (X^T X, rank <= tokens) is rank-deficient; logged as a warning


@dataclass
class PruneReport:
    """What a prune (or :func:`compute_masks`) did, layer by layer; ``to_dict()`` is ``prune_report.json``.

    Args:
        model_type: the model's ``config.model_type``.
        config: the pruning configuration, as a dict.
        layers: one report per pruned decoder layer (sparsity per Linear, tokens per pool, ATV's k, drift).
        samples: calibration samples used.
        seconds: wall time of the run.
        applied: whether the masks were applied to the weights (False for :func:`compute_masks`).
        masks: full dotted name -> bool mask (True = pruned), when kept.
        execution: the execution configuration of the run, as a dict.
        allocation: for non-uniform allocations, every layer's (group's) value and sparsity.
    """
    model_type: str
    config: dict[str, Any]
    layers: list[LayerReport]
    samples: int
    seconds: float
    applied: bool
    masks: dict[str, torch.Tensor] | None = None  # full dotted name -> bool mask (True = pruned)
    execution: dict[str, Any] = field(default_factory=dict)  # the ExecutionConfig of the run
    allocation: dict[str, Any] | None = None  # non-uniform allocations: per unit its value and sparsity

    @property
    def sparsity(self) -> float:
        """Mean sparsity over the pruned Linears (unweighted)."""
        values = [v for layer in self.layers for v in layer.sparsity.values()]
        return sum(values) / max(len(values), 1)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "masks"}
        out["mean_sparsity"] = self.sparsity
        return out


def prune_(model: nn.Module, config: MethodConfig | PruneConfig, calibration: Iterable[Mapping[str, Any]] = (),
           *, execution: ExecutionConfig | None = None, keep_masks: bool = False, progress: bool = True,
           adapter: Adapter | None = None) -> PruneReport:
    """Prune ``model`` in place, layer by layer, and return a report.

    Example::

        report = prune_(model, ATVConfig(sparsity=0.5), batches)

    Args:
        model: a Hugging Face vision-language model (or a decoder-only LM); its decoder layers are found by
            :func:`get_adapter`.
        config: what to prune and how: a method config (``WandaConfig``, ``ATVConfig``, ...) or the flat
            :class:`PruneConfig` (method, sparsity or N:M pattern, pool, targets, allocation).
        calibration: model input dicts (``input_ids``, ``attention_mask``, ``pixel_values``, ...), each a
            batch; every row counts as one sample. Not needed for ``method='magnitude'``.
        execution: how to run (offloading, pass schedule); None = ``ExecutionConfig()``. Masks do not
            depend on it.
        keep_masks: also keep every mask in ``report.masks`` (full dotted name -> bool, True = pruned).
        progress: show a progress bar over the layers.
        adapter: how to find, capture and replay the decoder layers; None = the model's own
            (``get_adapter(model)``). The MoT probe passes its routing adapter (``probe.adapter``) here.

    Returns:
        The per-layer report: sparsity per Linear, tokens per pool, ATV's k per sample and mean drift, time.

    Raises:
        ToolkitError: a subclass naming the problem (an unsupported model, calibration data that does not fit
            the method, a bad configuration), raised before any weight changes where it can be checked first.
    """
    return _run(model, adapter or get_adapter(model), config, execution or ExecutionConfig(), calibration,
                apply=True, keep_masks=keep_masks, progress=progress)


def compute_masks(model: nn.Module, config: MethodConfig | PruneConfig, calibration: Iterable[Mapping[str, Any]] = (),
                  *, execution: ExecutionConfig | None = None, progress: bool = True,
                  adapter: Adapter | None = None) -> PruneReport:
    """The masks :func:`prune_` would apply, with the model's weights restored afterwards.

    Same schedule as :func:`prune_` (later layers see pruned inputs, unless ``config.propagate`` is
    ``'dense'``), so analysis can compare masks (IoU) without pruning twice.

    Args:
        model: the model, as for :func:`prune_`; its weights are unchanged on return.
        config: what to prune and how (a method config, or the flat :class:`PruneConfig`).
        calibration: model input dicts, each a batch (see :func:`prune_`).
        execution: how to run; None = ``ExecutionConfig()``.
        progress: show a progress bar over the layers.
        adapter: as for :func:`prune_`.

    Returns:
        A report whose ``masks`` holds every mask (full dotted name -> bool tensor, True = pruned).

    Raises:
        ToolkitError: as :func:`prune_`.
    """
    return _run(model, adapter or get_adapter(model), config, execution or ExecutionConfig(), calibration,
                apply=False, keep_masks=True, progress=progress)


# -- validation --------------------------------------------------------------------------------
def _validate(model: nn.Module, adapter: Adapter, config: MethodConfig, batches: list[Mapping[str, Any]]) -> list[int]:
    n_layers = len(adapter.decoder_layers(model))
    if n_layers == 0:
        raise UnsupportedModelError(f"the {getattr(model.config, 'model_type', '?')} model has no decoder layers: "
                                    "there is nothing to prune")
    indices = list(range(n_layers)) if config.layers is None else check_layers(config.layers, n_layers)
    linears, experts = block_targets(adapter, model, indices[0] if indices else 0, config.targets)  # MoE hook
    needs_attention = config.pool is not None and get_pool(config.pool).needs_attention
    check_config(adapter.decoder_layers(model), indices, needs_attention, getattr(model.config, "model_type", "?"))
    for name, linear in {**linears, **experts.matrices}.items():
        if config.nm and linear.in_features % config.nm[1]:
            raise ConfigError(f"pattern {config.pattern}: {name} has {linear.in_features} input features, "
                              f"not divisible by {config.nm[1]}")
    if config.allocation.kind == "map":
        _check_map(config, n_layers)
    if not config.needs_calibration:
        return indices
    if not batches:
        uses = f"method {config.method!r}" if config.pool is not None else f"allocation {config.allocation.kind!r}"
        raise CalibrationError(f"{uses} needs calibration data; none was given")
    for j, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise CalibrationError(f"calibration item {j} must be a dict of model inputs with 'input_ids'")
    if config.pool is not None and get_pool(config.pool).needs_visual:
        n_visual = sum(int(adapter.visual_mask_of(model, b).sum()) for b in batches)
        if n_visual == 0:
            raise CalibrationError(
                f"pool {config.pool!r} needs visual tokens, but the calibration data has none (visual token ids "
                f"{adapter.visual_token_ids(model)}); use calibration samples with images or pool='text'")
    return indices


# -- orchestration -----------------------------------------------------------------------------
def _untargeted_experts(adapter, model: nn.Module, indices: list[int], targets) -> list[str]:
    """'<layer>.<module>' of the MoE experts of the chosen layers that no target resolves to."""
    left = []
    for i in indices:
        experts = {name for name in adapter.expert_weights(model) if name.split(".", 1)[0] == str(i)}
        if experts:
            matrices = block_targets(adapter, model, i, targets)[1].matrices
            left += [e for e in sorted(experts) if not any(m.startswith(e.split(".", 1)[1] + ".") for m in matrices)]
    return left


def _run(model: nn.Module, adapter: Adapter, config: MethodConfig | PruneConfig, execution: ExecutionConfig,
         calibration: Iterable[Mapping[str, Any]], *, apply: bool, keep_masks: bool, progress: bool) -> PruneReport:
    start = time.perf_counter()
    config = method_config(config)  # the flat form's per-method config
    batches = list(calibration) if config.needs_calibration else []
    indices = _validate(model, adapter, config, batches)
    dense_experts = _untargeted_experts(adapter, model, indices, config.targets)
    if dense_experts:
        log.warning("MoE expert weights left dense (the targets do not name them): %s", dense_experts)
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    reports = []
    layers = adapter.decoder_layers(model)
    needs_attention = config.pool is not None and get_pool(config.pool).needs_attention
    with torch.no_grad(), _eager_attention(model, needs_attention), eager_experts(model, layers), \
            _offloading(layers, execution):
        captured = _capture_all(model, adapter, batches, execution.activations_device, progress)
        allocation = _allocation(model, adapter, config, indices, captured)
        last = indices[-1] if indices else -1
        for i in tqdm(range(last + 1), desc="layers", disable=not progress):
            if i not in indices:
                propagate_(model, adapter, captured, [i])
                continue
            t0 = time.perf_counter()
            counts = allocation.counts[i] if allocation is not None else None
            pruner = LayerPruner(model, adapter, config, i, captured, apply, execution, counts)
            report = pruner.run(masks if keep_masks else None)
            report.seconds = time.perf_counter() - t0
            reports.append(report)
            log.info("layer %d: sparsity %s", i, report.sparsity)
        del layers
    _warn_thin_pools(reports, config.pool)
    samples = sum(int(b.hidden.shape[0]) for b in captured)
    return PruneReport(getattr(model.config, "model_type", "?"), config.to_dict(), reports, samples,
                       time.perf_counter() - start, apply, masks if keep_masks else None, execution.to_dict(),
                       None if allocation is None else allocation.to_dict())


def _warn_thin_pools(reports: list[LayerReport], pool: str | None) -> None:
    """One warning for the layers whose pool held fewer tokens than their narrowest target input."""
    thin = [r for r in reports if r.thin_pool]
    if thin:
        log.warning("%d of %d layers: the %r calibration pool selected fewer tokens than a target has input features "
                    "(fewest: %d at layer %d), so each X^T X statistic is rank-deficient (SparseGPT's Hessian is "
                    "carried by its dampening); calibrate on more samples for steadier masks", len(thin), len(reports),
                    pool, min(r.pooled_tokens for r in thin), min(thin, key=lambda r: r.pooled_tokens).index)


# -- allocation --------------------------------------------------------------------------------
def _check_map(config: MethodConfig, n_layers: int) -> None:
    """The sensitivity map is readable and was made on a model with this many decoder layers."""
    found = read_sensitivity_map(config.allocation.path)
    if found.num_layers != n_layers:
        raise ConfigError(f"the sensitivity map {config.allocation.path!r} was made on a model with "
                          f"{found.num_layers} decoder layers, this one has {n_layers}; make a map of this model")


def _allocation(model: nn.Module, adapter: Adapter, config: MethodConfig, indices: list[int],
                captured: list[CapturedBatch]) -> Allocation | None:
    """The prune count of every target of every pruned layer (None for the uniform allocation)."""
    if config.allocation.kind == "uniform" or not indices:
        return None
    sizes = {}
    for i in indices:
        linears, experts = block_targets(adapter, model, i, config.targets)
        sizes[i] = {n: t.out_features * t.in_features for n, t in {**linears, **experts.matrices}.items()}
    if config.allocation.kind == "owl":
        units = owl_units(_outlier_ratios(model, adapter, config, indices, captured), sizes)
    else:
        units = map_units(read_sensitivity_map(config.allocation.path).group_sensitivity(), sizes)
    plan = allocate(config.allocation.kind, units, config.sparsity, config.allocation.lmbda)
    log.info("allocation %s: %s", config.allocation.kind, [round(s, 4) for s in plan.sparsities])
    return plan


def _outlier_ratios(model: nn.Module, adapter: Adapter, config: MethodConfig, indices: list[int],
                    captured: list[CapturedBatch]) -> dict[int, float]:
    """OWL's statistic: one dense pass of the decoder (on copies of the captured batches, which the engine's
    own passes still need), every non-padding token feeding the Wanda norms of each pruned layer's Linears
    (MoE expert matrices are left out of the ratio; their layer's sparsity still applies to them)."""
    batches = [batch.fork() for batch in captured]  # own ``hidden``: the replay chains through the copies
    layers = adapter.decoder_layers(model)
    ratios = {}
    for i in range(indices[-1] + 1):
        if i not in indices:
            propagate_(model, adapter, batches, [i])
            continue
        linears, _ = block_targets(adapter, model, i, config.targets)
        with onloaded(layers[i]):
            norms = _dense_norms(model, adapter, batches, i, linears)
            scores = [wanda_scores(linear.weight, norms[name].result()) for name, linear in linears.items()]
            ratios[i] = outlier_ratio(scores, config.allocation.m)
    return ratios


def _dense_norms(model: nn.Module, adapter: Adapter, batches: list[CapturedBatch], index: int,
                 linears: Mapping[str, nn.Module]) -> dict[str, SquaredNorms]:
    """Squared input norms of ``linears`` over every non-padding token, from one dense pass of layer ``index``
    that also advances ``batches`` to its outputs; Linears reading one tensor share one accumulator."""
    device = execution_device(adapter.decoder_layers(model)[index])
    norms: dict[str, SquaredNorms] = {}
    with record_inputs(linears) as acts:
        for step in replay_layers(model, adapter, batches, [index]):
            if not norms:
                norms = _shared_accumulators(linears, acts, lambda width: SquaredNorms(width, device=device))
            for acc, x in _distinct_inputs(norms, acts):
                acc.add(_pooled_rows(x, step.batch.valid), samples=int(step.batch.hidden.shape[0]))
    return norms


@contextlib.contextmanager
def _eager_attention(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Pools like TAMP's need attention probabilities, which only eager attention returns; the masks captured
    under it are the eager ones, so the whole run uses it."""
    previous = getattr(model.config, "_attn_implementation", None)
    if not enabled or previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _offloading(layers: nn.ModuleList, execution: ExecutionConfig) -> contextlib.AbstractContextManager:
    """With ``execution.offload``, decoder layers not already dispatched by accelerate get CPU-offload hooks
    for the run (one layer's weights on its execution device at a time)."""
    if not execution.offload:
        return contextlib.nullcontext()
    return cpu_offloaded(list(layers), execution.layer_device)


def _capture_all(model: nn.Module, adapter: Adapter, batches: list[Mapping[str, Any]], offload: torch.device,
                 progress: bool) -> list[CapturedBatch]:
    captured = []
    for i, inputs in enumerate(tqdm(batches, desc="capture", disable=not progress or not batches), 1):
        try:
            captured.append(capture(model, adapter, inputs).to(offload))
        except ToolkitError:
            raise
        except (RuntimeError, ValueError) as err:  # transformers' own checks (image size, token counts, shapes)
            raise forward_failed(err, f"calibration batch {i}") from err
    return captured


class _InputsRecorded(Exception):
    """Ends a dense pass early: every target's input is recorded and the layer's output is not needed."""


@contextlib.contextmanager
def record_inputs(linears: Mapping[str, nn.Linear], stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``acts[name]`` is the last input of each Linear (shared tensors stay shared).

    With ``stop``, the forward is cut short (:class:`_InputsRecorded`) as soon as every Linear has an input: the
    caller must not need the output, and each Linear must run once per forward (its first input is then its last).
    """
    acts: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, linear in linears.items():
            def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
                acts[name] = args[0]
                if stop and len(acts) == len(linears):
                    raise _InputsRecorded
            handles.append(linear.register_forward_pre_hook(hook))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


class LayerPruner:
    """Prunes one decoder layer: statistics from a dense pass, masks, apply, pruned recompute."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: MethodConfig, index: int,
                 captured: list[CapturedBatch], apply: bool, execution: ExecutionConfig,
                 counts: dict[str, int] | None = None):
        self.model, self.adapter, self.config, self.index = model, adapter, config, index
        self.counts = counts  # non-uniform allocation: exact weights to prune per target (None: config.sparsity)
        self.execution = execution
        self.captured, self.apply = captured, apply
        self.layer = adapter.decoder_layers(model)[index]
        # MoE hook: fused expert matrices (pruning.experts) are targets beside the Linears; none on dense blocks
        self.linears, self.experts = block_targets(adapter, model, index, config.targets)
        self.targets = {**self.linears, **self.experts.matrices}  # name -> module or ExpertMatrix with .weight
        self.device = execution_device(self.layer)
        self.report = LayerReport(index=index, sparsity={})
        self.generator = torch.Generator().manual_seed(config.seed * 100_003 + index)
        self.scorer = get_scorer(config.scorer)
        self.pool = get_pool(config.pool) if config.pool is not None else None
        self.attention: torch.Tensor | None = None

    def run(self, masks_out: dict[str, torch.Tensor] | None) -> LayerReport:
        with onloaded(self.layer) as hooked:  # an offloaded layer's weights stay on its device for the block
            self._run(masks_out)
            if self.apply:
                write_back_(hooked, [lin.weight for lin in self.linears.values()] + self.experts.parameters())
        return self.report

    def _run(self, masks_out: dict[str, torch.Tensor] | None) -> None:
        originals = {} if self.apply else {n: t.weight.detach().clone() for n, t in self.targets.items()}
        stats, dense_outs = ({}, None)
        if self.scorer.needs is not None:
            stats, dense_outs = self._statistics()
            self._check_pool()
        masks, new_weights = self._masks(stats)
        self._apply(masks, new_weights)
        if self.captured:
            self._next_inputs(dense_outs)
        if masks_out is not None:
            prefix = self._prefix()
            masks_out.update({f"{prefix}.{n}": m.cpu() for n, m in masks.items()})
        for name, weight in originals.items():
            self.targets[name].weight.copy_(weight)
        self.report.experts = self.experts.report()

    def _prefix(self) -> str:
        for name, module in self.model.named_modules():
            if module is self.layer:
                return name
        return f"layers.{self.index}"

    # -- statistics ------------------------------------------------------------------------
    def _accumulators(self, acts: dict[str, torch.Tensor]) -> dict[str, SquaredNorms | Hessian]:
        """The statistics of this layer's Linears (attention pools select tokens per Linear: never shared)."""
        kind = ACCUMULATORS[self.scorer.needs]
        return _shared_accumulators(self.linears, acts, lambda width: kind(width, device=self.device),
                                    shared=not self.pool.needs_attention)

    def _dense_pass(self, batch: CapturedBatch, stop: bool = False
                    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], CapturedBatch]:
        """One batch through the dense layer: (its output, each target's input, the batch on the layer's device).
        With ``stop`` (see :meth:`_may_stop_early`) the pass ends once every target has its input and the output is
        None: the rest of the layer (e.g. the last projection's matmul) is skipped, the inputs are the same tensors."""
        try:
            with record_inputs(self.linears, stop) as acts, self._record_attention() as attention, \
                    self.experts.recording() as routed:
                step = next(replay_layers(self.model, self.adapter, [batch], [self.index], chain=False))
            outputs, moved = step.outputs, step.batch
        except _InputsRecorded:
            outputs, moved = None, on_device(batch, self.device)
        self.attention = attention.get("probs")
        acts = dict(acts)
        if routed:
            acts[ROUTED] = routed  # MoE hook: per-expert routing records, stashed and moved like the activations
        return outputs, acts, moved

    def _may_stop_early(self) -> bool:
        """A dense pass may end at the last target's input: no attention probabilities or expert routing to record
        (they may come later in the layer) and no state the replay hands on to later layers."""
        return not self.pool.needs_attention and not self.experts and not self.adapter.handed_on(self.model)

    @contextlib.contextmanager
    def _record_attention(self) -> Iterator[dict[str, torch.Tensor]]:
        """For attention pools: the attention probabilities (B, H, T, T) of this layer's dense pass."""
        found: dict[str, torch.Tensor] = {}
        if not self.pool.needs_attention:
            yield found
            return

        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            found["probs"] = output[1]

        handle = self.adapter.attention_module(self.layer).register_forward_hook(hook)
        try:
            yield found
        finally:
            handle.remove()

    def _statistics(self) -> tuple[dict[str, SquaredNorms | Hessian], list[torch.Tensor] | None]:
        stats: dict[str, SquaredNorms | Hessian] = {}
        keep_dense = self.config.propagate == "dense"
        dense_outs: list[torch.Tensor] | None = [] if keep_dense else None
        mean_drift, deferred = None, self.config.needs_mean_drift
        if deferred and self._schedule() == "three-pass":
            mean_drift, deferred = self._mean_drift(), False
        stash, visual_drifts = [], []
        offload = self.captured[0].hidden.device
        stop = not (keep_dense or self.pool.needs_drift) and self._may_stop_early()  # the output is not read
        for batch in self.captured:
            out, acts, moved = self._dense_pass(batch, stop)
            if not stats:
                stats = self._accumulators(acts)
            drifts = drift(moved.hidden, out) if self.pool.needs_drift else None
            if dense_outs is not None:
                dense_outs.append(out.to(offload))
            if deferred:
                visual_drifts.append(drifts[moved.visual & moved.valid])
                stash.append((map_tensors(acts, lambda t: t.to(offload)), drifts.to(offload), batch))
            else:
                self._add(stats, acts, moved, drifts, mean_drift)
        if deferred:
            mean_drift = float(torch.cat(visual_drifts).mean()) if visual_drifts else 0.0
            for acts, drifts, batch in stash:
                self._add(stats, map_tensors(acts, lambda t: t.to(self.device)), on_device(batch, self.device),
                          drifts.to(self.device), mean_drift)
        self.report.mean_drift = mean_drift
        return stats, dense_outs

    def _schedule(self) -> str:
        if self.execution.schedule != "auto":
            return self.execution.schedule
        tokens = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in self.captured)
        features = sum(lin.in_features for lin in self.linears.values()) + self.experts.stash_features()  # MoE hook
        fits = stash_fits(tokens, features, self.captured[0].hidden.element_size(), self.execution.stash_budget_gb)
        return "two-pass" if fits else "three-pass"

    def _mean_drift(self) -> float:
        """Drift-only pass (the reference's first pass)."""
        values = [drift(step.inputs, step.outputs)[step.batch.visual & step.batch.valid]
                  for step in replay_layers(self.model, self.adapter, self.captured, [self.index], chain=False)]
        return float(torch.cat(values).mean()) if values else 0.0

    def _add(self, stats: dict[str, SquaredNorms | Hessian], acts: dict[str, torch.Tensor], batch: CapturedBatch,
             drifts: torch.Tensor | None, mean_drift: float | None) -> None:
        if self.pool.needs_attention:
            return self._add_per_linear(stats, acts, batch)
        params = self.config.pool_params(mean_drift, self.generator)
        pool, ks = self.pool.fn(batch.visual, batch.valid, drifts, params)
        self.report.k_per_sample.extend(ks)
        samples = int(batch.hidden.shape[0])
        whole = bool(pool.all())  # every position pooled: the rows in order, without a gather copy
        for acc, x in _distinct_inputs(stats, acts):
            acc.add(x.flatten(0, -2) if whole else _pooled_rows(x, pool), samples=samples)
        self.report.memory_inputs = [name for name in stats if not _reads_tokens(acts[name], pool)]
        if self.experts:  # MoE hook: each expert's statistics from its routed tokens within the pool
            kwargs = batch.layer_kwargs[self.index]
            reads = {n: self.adapter.expert_tokens(kwargs, n, batch.valid.shape) for n in self.experts.modules}
            self.experts.add(acts[ROUTED], pool, batch.valid, samples, self.scorer.needs, self.device, reads)
        self._count(batch, pool)

    def _add_per_linear(self, stats: dict[str, SquaredNorms | Hessian], acts: dict[str, torch.Tensor],
                  batch: CapturedBatch) -> None:
        """Attention pools (TAMP) select tokens per Linear and per sample from the Linear's own outputs; the
        report's pooled/visual-selected counts are then means over the Linears."""
        if self.attention is None:
            raise ConfigError(f"the {self.pool.name} pool needs attention probabilities; this layer's attention "
                              "returned none")
        scores = self.attention.float().mean(dim=1)  # (B, T, T), mean over heads
        pooled = visual_chosen = 0
        for b in range(batch.hidden.shape[0]):
            valid = batch.valid[b]
            last = int(valid.nonzero().max())
            attention, visual = scores[b, last][valid], batch.visual[b][valid]
            for name, acc in stats.items():
                rows = _as_tokens(acts[name], batch.valid.shape)[b][valid]
                linear = self.linears[name]
                chosen = self.pool.fn(nn.functional.linear(rows, linear.weight, linear.bias), visual, attention)
                acc.add(rows[chosen], samples=1)
                pooled += int(chosen.sum())
                visual_chosen += int((chosen & visual).sum())
        self._count(batch, torch.zeros_like(batch.valid))
        self.report.pooled_tokens += round(pooled / len(stats))
        self.report.visual_selected += round(visual_chosen / len(stats))

    def _check_pool(self) -> None:
        """Refuse a layer whose pool selected no token (zero statistics tie every score and the masks would be
        arbitrary), before any of its weights change; flag and log one with fewer tokens than the narrowest
        target input. An expert that no pooled token reached is not an empty pool (it is pruned by magnitude)."""
        report = self.report
        if report.pooled_tokens == 0:
            raise CalibrationError(
                f"decoder layer {self.index}: the {self.pool.name!r} calibration pool selected no token in any batch "
                f"({report.text_tokens + report.visual_tokens} non-padding tokens: {report.text_tokens} text, "
                f"{report.visual_tokens} visual); calibrate on samples holding tokens this pool keeps, or choose "
                "another pool")
        floor = min((target.in_features for target in self.targets.values()), default=0)
        report.thin_pool = report.pooled_tokens < floor
        if report.thin_pool:  # one warning per run (see _warn_thin_pools); the per-layer detail when asked
            log.debug("decoder layer %d: the %r calibration pool selected %d tokens, fewer than the narrowest "
                      "target input (%d features)", self.index, self.pool.name, report.pooled_tokens, floor)

    def _count(self, batch: CapturedBatch, pool: torch.Tensor) -> None:
        visual, valid = batch.visual & batch.valid, batch.valid & ~batch.visual
        self.report.text_tokens += int(valid.sum())
        self.report.visual_tokens += int(visual.sum())
        self.report.pooled_tokens += int(pool.sum())
        self.report.visual_selected += int((pool & visual).sum())

    # -- masks -----------------------------------------------------------------------------
    def _masks(self, stats: dict[str, SquaredNorms | Hessian]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        masks, new_weights = {}, {}
        for name, linear in self.linears.items():
            statistic = stats[name].result() if stats else None
            count = None if self.counts is None else self.counts[name]
            masks[name], new_weight = self.scorer.prune(linear.weight, statistic, self.config.sparsity, self.config.nm,
                                                        count, **self.config.scorer_options)
            if new_weight is not None:
                new_weights[name] = new_weight
        if self.experts:  # MoE hook: expert matrices, per row like any Linear (magnitude where no token was routed)
            expert_masks, expert_weights = self.experts.masks(
                self.scorer, self.config.sparsity, self.config.nm, self.counts, **self.config.scorer_options)
            masks.update(expert_masks)
            new_weights.update(expert_weights)
        return masks, new_weights

    def _apply(self, masks: dict[str, torch.Tensor], new_weights: dict[str, torch.Tensor]) -> None:
        for name, linear in self.targets.items():
            if name in new_weights:
                linear.weight.copy_(new_weights[name])
            else:
                apply_mask_(linear, masks[name])
            value = sparsity_of(linear.weight) if self.apply else float(masks[name].float().mean())
            self.report.sparsity[name] = value

    def _next_inputs(self, dense_outs: list[torch.Tensor] | None) -> None:
        if dense_outs is not None:
            for batch, out in zip(self.captured, dense_outs):
                batch.hidden = out
            return
        propagate_(self.model, self.adapter, self.captured, [self.index])


def _pooled_rows(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (B, T, d) at ``pool`` (B, T). Inputs with extra singleton token dimensions (MLA's
    (B, 1, T, d) latents) or flattened tokens (an MoE block's (B*T, d)) are viewed in the same (B*T) order.
    An input whose rows are not the decoder's tokens (a cross-attention layer's K/V read the image memory,
    (N, M, d)) gives every row: the pool chooses among tokens and has no say over rows that are not tokens."""
    if not _reads_tokens(x, pool):
        return x.reshape(-1, x.shape[-1])
    return _as_tokens(x, pool.shape)[pool]


def _reads_tokens(x: torch.Tensor, pool: torch.Tensor) -> bool:
    return x.shape[:-1] == pool.shape or tokens_align(pool.shape, x.shape[:-1])


def _as_tokens(x: torch.Tensor, tokens: torch.Size) -> torch.Tensor:
    """A Linear's input ``x`` as (B, T, d) for the (B, T) ``tokens``: inputs with extra singleton token
    dimensions (MLA's (B, 1, T, d) latents) or flattened tokens (an MoE block's (B*T, d)) are viewed in the
    same (B*T) order."""
    if x.shape[:-1] == tokens:
        return x
    if not tokens_align(tokens, x.shape[:-1]):
        raise CalibrationError(f"a Linear's input of shape {tuple(x.shape)} does not line up with the "
                               f"(B, T) = {tuple(tokens)} tokens; its statistics cannot be pooled by token")
    return x.reshape(*tokens, x.shape[-1])


def _shared_accumulators(linears: Mapping[str, nn.Module], acts: Mapping[str, torch.Tensor],
                         new: Callable[[int], SquaredNorms | Hessian], *, shared: bool = True
                         ) -> dict[str, SquaredNorms | Hessian]:
    """Linear name -> its accumulator (``new(in_features)``), one per distinct input tensor in ``acts``: Linears fed
    the same activations (q/k/v, gate/up) share it, so their statistics are computed once (:func:`_distinct_inputs`
    feeds each once per batch). Without ``shared``, one per Linear."""
    by_input: dict[Any, SquaredNorms | Hessian] = {}
    stats = {}
    for name, linear in linears.items():
        key = id(acts[name]) if shared else name
        if key not in by_input:
            by_input[key] = new(linear.in_features)
        stats[name] = by_input[key]
    return stats


def _distinct_inputs(stats: dict[str, SquaredNorms | Hessian],
                     acts: dict[str, torch.Tensor]) -> list[tuple[SquaredNorms | Hessian, torch.Tensor]]:
    """(accumulator, its input) once per shared accumulator. Should a Linear stop sharing its group's input
    tensor, it gets its own copy of the group's accumulator from then on (statistics stay per Linear)."""
    owner: dict[int, str] = {}
    for name, acc in list(stats.items()):
        first = owner.setdefault(id(acc), name)
        if first != name and acts[name] is not acts[first]:
            stats[name] = copy.deepcopy(acc)
            owner[id(stats[name])] = name
    return [(stats[name], acts[name]) for name in owner.values()]

