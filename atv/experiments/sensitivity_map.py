"""The sensitivity map (``atv probe --map``): where each pathway of a decoder is fragile, layer by layer.

One cell per (decoder layer, pathway, projection group): the probe prunes that layer's text or visual
path, its attention projections or its FFN projections only, at one sparsity (0.7 by default), and the
cell is scored against the dense model by a cheap metric that needs no benchmark answers: mean KL and
top-1 agreement of the next-token distributions on held-out multimodal prompts (benchmark questions with
an image, their answers appended; :mod:`evaluation.prompt_fidelity`). ``map_benchmarks`` also scores the
benchmarks in every cell (slow).

What a map costs: one dense pass over the calibration batches gives every layer's masks (a cell prunes one
layer, so its statistics are the dense inputs of that layer: :class:`LayerMasks`), and one dense pass over the
prompts keeps every decoder layer's inputs; a cell on layer l then replays layers l.. only, and the LM head
only where a position is scored (:func:`evaluation.prompt_fidelity.replayed_fidelity`; the same KL and top-1
as the cell's full forward, tested).

The folder holds the resumable, fingerprinted records (``results.jsonl``, ``study.json``, as the grid's),
the dense reference (``map_reference.pt``), the tables ``map_table.*`` (KL) and ``map_top1.*`` (top-1), and
``sensitivity_map.json``, which ``PruneConfig(allocation="map", allocation_map=...)`` reads.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from analysis.sensitivity_map import map_table
from analysis.tables import write_table
from evaluation.intervals import Bootstrap, mean_interval
from evaluation.prompt_fidelity import (
    Prompt,
    PromptFidelity,
    PromptReference,
    PromptStates,
    answer_prompts,
    prompt_fidelity,
    prompt_reference,
    prompt_states,
    replayed_fidelity,
)
from mot_probe.routing import PATHS
from mot_probe.surgery import PROBE_POOLS, MoTProbe, attach_probe_, probe_pool
from pruning.adapters import Adapter
from pruning.allocation import GROUPS, MAP_FILE, SensitivityMap, projection_group
from pruning.config import PruneConfig
from pruning.engine import compute_masks
from pruning.errors import ToolkitError, UnsupportedModelError
from pruning.masks import apply_mask_
from pruning.options import option
from pruning.outputs import write_text_atomic
from pruning.registry import get_scorer

from .cells import (
    ITEM_DIGITS,
    StudySettings,
    complete_record,
    dense_reference,
    evaluate_cell,
    load_reference,
    open_benchmarks,
    open_log,
    prune_summary,
    scores_entry,
)
from .cells import run_cells as run_logged_cells
from .records import ResultLog, study_lock
from .share import environment

log = logging.getLogger(__name__)

REFERENCE = "map_reference.pt"
DENSE = {"pathway": "dense"}


@dataclass
class MapSettings:
    """The map's own settings (``--map-*``)."""

    map_sparsity: float = option(0.7, "--map: sparsity of the pruned layer-path-group in every cell", within="(0, 1)")
    map_groups: tuple[str, ...] = option(GROUPS, "--map: projection groups, pruned one at a time", choices=GROUPS,
                                         label="map group")
    map_pool: str = option("mixed", "--map: calibration pool of every cell", choices=PROBE_POOLS, label="probe pool")
    map_items: int = option(32, "--map: held-out multimodal prompts (benchmark questions with an image, answers "
                                "appended) the KL and top-1 agreement are measured on", within=">= 1")
    map_benchmarks: bool = option(False, "--map: also score the benchmarks in every cell (slow)")


@dataclass
class MapConfig(StudySettings, MapSettings):
    """The sensitivity map: its own settings, then those every study shares (checked together)."""

    def cells(self, probe: MoTProbe) -> list[dict[str, Any]]:
        """The dense cell, then layer by layer every pathway and group that has routed projections."""
        cells = [dict(DENSE)]
        for layer in range(len(probe.routed)):
            for path in self.pathways:
                for group in self.map_groups:
                    if group_targets(probe, layer, group):
                        cells.append({"layer": layer, "pathway": path, "group": group, "sparsity": self.map_sparsity})
        return cells


def group_targets(probe: MoTProbe, layer: int, group: str) -> tuple[str, ...]:
    """The routed projections of ``layer`` in ``group`` ('attn' or 'ffn')."""
    return tuple(name for name in probe.routed[layer] if projection_group(name) == group)


@dataclass
class MapResult:
    out_dir: Path
    records: list[dict[str, Any]]
    computed: int                                      # cells computed by this run (the rest were resumed)
    num_layers: int
    tables: list[Path] = field(default_factory=list)

    @property
    def table(self) -> tuple[list[str], list[list[str]]]:
        return map_table(self.records, "kl")

    @property
    def map_path(self) -> Path:
        return self.out_dir / MAP_FILE


def run_map_study(model: nn.Module, processor, calibration: Sequence[Mapping[str, Any]], benchmarks: Sequence[Any],
                  out_dir: str | Path, config: MapConfig | None = None, *, setup_extra: Mapping[str, Any] | None = None,
                  progress: bool = True, on_cell: Callable[[dict[str, Any]], None] | None = None) -> MapResult:
    """Run (or resume) the sensitivity map on ``model`` (probed in place, unloaded at the end).

    calibration: model-input batches (with images) for the pruner; benchmarks: harness benchmarks, whose
    question items with an image give the prompts. ``on_cell`` is called with each new record."""
    config = config or MapConfig()
    benches = open_benchmarks(benchmarks)
    prompts = answer_prompts(benches, config.map_items, config.seed)  # refused before any model work
    with study_lock(out_dir):
        results = open_log(out_dir, config, benches, len(calibration),
                           {"kind": "sensitivity map", **(setup_extra or {})})
        probe = attach_probe_(model)
        try:
            cells = config.cells(probe)
            todo = [c for c in cells if not results.done(c)]
            scorer = PromptScorer.open(results, model, processor, prompts, config.batch_size,
                                       probe.adapter) if todo else None
            bench_reference = load_reference(results, benches, lambda: dense_reference(model, processor, benches,
                                                                                      progress)) \
                if config.map_benchmarks and todo else None
            masks = LayerMasks(model, probe, calibration, config, [c["layer"] for c in todo if "layer" in c])

            def compute(cell: dict[str, Any], _shared: Any) -> dict[str, Any]:
                try:
                    return _score(cell, probe, model, processor, scorer, config, benches, bench_reference, progress,
                                  masks)
                finally:
                    probe.reset_()

            computed = run_logged_cells(results, cells, compute, desc="map cells", progress=progress, on_cell=on_cell,
                                        record=_map_record)
            num_layers = len(probe.routed)
        finally:
            probe.unload()
        result = MapResult(results.out_dir, results.ordered(cells), computed, num_layers)
        result.tables = write_table(map_table(result.records, "kl"), "map_table", results.out_dir)
        result.tables += write_table(map_table(result.records, "top1"), "map_top1", results.out_dir)
        write_text_atomic(result.map_path, sensitivity_map(result.records, num_layers, config).to_json(
            {"metric": "kl", "pool": config.map_pool, "method": config.method, "prompts": config.map_items}))
    return result


@dataclass
class PromptScorer:
    """How the map scores a cell on the prompts: replayed from the cell's layer on (``states``), or, for a model
    whose forward changes the logits after its LM head (the replay cannot reproduce them), by full forwards."""

    prompts: list[Prompt]
    reference: PromptReference
    states: PromptStates | None
    batch_size: int
    adapter: Adapter | None = None  # replays the model's layers (the probe's, which routes); None: the model's own

    def __call__(self, model: nn.Module, processor, first_layer: int) -> PromptFidelity:
        if self.states is None:
            return prompt_fidelity(model, processor, self.prompts, self.reference, batch_size=self.batch_size)
        return replayed_fidelity(model, self.states, self.reference, first_layer, adapter=self.adapter)

    @classmethod
    def open(cls, results: ResultLog, model: nn.Module, processor, prompts: list[Prompt],
             batch_size: int, adapter: Adapter | None = None) -> "PromptScorer":
        """The dense model's layer inputs on the prompts (one pass per run) and its prompt distributions: those
        are computed once and kept in the study folder, so a resumed map scores against its first cells' reference."""
        path = results.out_dir / REFERENCE
        stored = None
        if path.is_file():
            try:
                stored = PromptReference.load(path)
            except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
                raise ToolkitError(f"{path} is corrupt ({type(err).__name__}); delete it to recompute the dense "
                                   "reference, or choose another --out") from None
        try:
            states, fresh = prompt_states(model, processor, prompts, batch_size=batch_size, adapter=adapter)
        except UnsupportedModelError as err:
            log.warning("the map scores every cell with full forwards (slower): %s", err)
            states = None
            fresh = stored if stored is not None else prompt_reference(model, processor, prompts, batch_size=batch_size)
        if stored is not None:
            return cls(prompts, stored, states, batch_size, adapter)
        results.pin()
        tmp = path.with_suffix(".partial")
        fresh.save(tmp)
        tmp.replace(path)
        return cls(prompts, fresh, states, batch_size, adapter)


class LayerMasks:
    """The masks of the decoder layers' routed projections, computed for all the map's layers in one pass.

    A cell prunes one layer only, so its masks come from the dense model's inputs to that layer, whatever the
    pathway and the group: one :func:`pruning.compute_masks` over the calibration batches with
    ``propagate='dense'`` (every layer's statistics from the dense inputs, no pruned pass) gives every layer's
    masks, bit-identical to pruning each cell on its own (tested). Layers whose routed names differ (hybrid
    blocks) get one pass per set of names. The masks of a layer are dropped once the map moves past it; a cell
    on a dropped or a new layer computes the pass again for the layers from it on. Scorers that update the kept
    weights (SparseGPT) prune every cell with ``prune_path_`` instead."""

    def __init__(self, model: nn.Module, probe: MoTProbe, calibration: Sequence[Mapping[str, Any]], config: MapConfig,
                 layers: Sequence[int] | None = None):
        self.model, self.probe, self.calibration, self.config = model, probe, calibration, config
        self.layers = sorted(set(range(len(probe.routed)) if layers is None else layers))  # layers with cells to do
        self.masks: dict[int, dict[str, Any]] = {}
        self.seconds = 0.0

    def prune_config(self, layers: tuple[int, ...], targets: tuple[str, ...], **kwargs) -> PruneConfig:
        return PruneConfig(self.config.method, sparsity=self.config.map_sparsity, pool=probe_pool(self.config.map_pool),
                           seed=self.config.seed, layers=layers, targets=targets, **kwargs)

    def prune_(self, cell: Mapping[str, Any]) -> dict[str, Any]:
        """Prune the cell's path of its layer-group in place; returns the record's ``prune`` entry."""
        layer, path, names = cell["layer"], cell["pathway"], group_targets(self.probe, cell["layer"], cell["group"])
        config = self.prune_config((layer,), names)
        if get_scorer(config.scorer).updates_weights:
            return prune_summary(self.probe.prune_path_(path, config, self.calibration, progress=False))
        for done in [i for i in self.masks if i < layer]:
            del self.masks[done]
        if layer not in self.masks:
            self._compute([i for i in self.layers if i >= layer] if layer in self.layers else [layer])
        for name in names:
            apply_mask_(self.probe.routed[layer][name].materialise_(path), self.masks[layer][name])
        fractions = [float(self.masks[layer][n].float().mean()) for n in names]
        return {"mean_sparsity": sum(fractions) / len(fractions), "seconds": self.seconds,
                "config": config.to_dict(), "masks": "one dense calibration pass for every layer of the map"}

    def _compute(self, layers: list[int]) -> None:
        """The masks of every routed projection of ``layers``, from dense inputs; one pass per set of routed names."""
        start = time.perf_counter()
        blocks = self.probe.family.decoder_layers(self.model)
        prefixes = {id(m): n for n, m in self.model.named_modules()}
        by_names: dict[tuple[str, ...], list[int]] = {}
        for i in layers:
            by_names.setdefault(tuple(self.probe.routed[i]), []).append(i)
        for names, group in by_names.items():
            config = self.prune_config(tuple(group), names, propagate="dense")
            report = compute_masks(self.model, config, self.calibration, progress=False, adapter=self.probe.adapter)
            for i in group:
                prefix = prefixes[id(blocks[i])]
                self.masks[i] = {name: report.masks[f"{prefix}.{name}"] for name in names}
        self.seconds = time.perf_counter() - start
        log.info("map masks of %d layers in %.1f s", len(layers), self.seconds)


def _score(cell, probe: MoTProbe, model, processor, scorer: PromptScorer, config: MapConfig, benches,
           bench_reference, progress: bool, masks: LayerMasks) -> dict[str, Any]:
    """Prune the cell's layer-path-group (nothing for the dense cell) and score it: the cell's measurement. The
    cell changes nothing before its layer, so the prompts are replayed from that layer's kept dense inputs (the
    dense cell from layer 0: the whole decoder)."""
    start = time.perf_counter()
    prune = None if cell == DENSE else masks.prune_(cell)
    fidelity = scorer(model, processor, cell.get("layer", 0))
    record: dict[str, Any] = {"cell": dict(cell), "prune": prune}
    boot = Bootstrap(seed=config.seed)
    if config.map_benchmarks:
        record.update(scores_entry(evaluate_cell(model, processor, benches, config, bench_reference, progress), boot))
    record.update(kl=fidelity.kl, top1=fidelity.top1,
                  kl_items=[float(f"{v:.6g}") for v in fidelity.kl_items],  # 6 significant digits: KL can be tiny
                  top1_items=[round(v, ITEM_DIGITS) for v in fidelity.top1_items],
                  bootstrap={"level": boot.level, "resamples": boot.resamples, "seed": boot.seed},
                  seconds=time.perf_counter() - start, environment=environment(model))
    if cell == DENSE:
        record["prompts"] = [p.id for p in scorer.prompts]  # the items' order of kl_items / top1_items
    return record


def _map_record(measurement: Mapping[str, Any], dense: Mapping[str, Any] | None) -> dict[str, Any]:
    """A map cell's record: its measurement with the 95% bootstrap intervals of its mean KL and top-1 over the
    prompts, and, when it was scored on benchmarks (``--map-benchmarks``), retention against ``dense`` with
    intervals paired on the items."""
    boot = Bootstrap(**measurement["bootstrap"])
    record = dict(measurement)
    intervals = {metric: mean_interval(measurement[f"{metric}_items"], f"map {metric}", boot).to_list()
                 for metric in ("kl", "top1")}
    if "scores" in measurement:
        kept = complete_record(measurement, dense)
        record.update(retention=kept["retention"], mean_retention=kept["mean_retention"])
        intervals.update(kept.get("intervals", {}))
    record["intervals"] = intervals
    return record


def sensitivity_map(records: Sequence[Mapping[str, Any]], num_layers: int, config: MapConfig) -> SensitivityMap:
    """The allocation's view of the records: (layer, pathway, group) -> mean KL."""
    kl = {(int(r["cell"]["layer"]), r["cell"]["pathway"], r["cell"]["group"]): float(r["kl"])
          for r in records if "layer" in r["cell"]}
    return SensitivityMap(num_layers, config.map_sparsity, kl)


def pathway_contrast(records: Sequence[Mapping[str, Any]], group: str | None = None,
                     boot: Bootstrap | None = None) -> dict[str, Any]:
    """How much more the text pathway costs than the visual one across the map: per prompt, the mean KL of
    the text cells (every layer; ``group`` 'attn' or 'ffn' only, or both) minus that of the visual cells, then
    the mean over the prompts with its 95% bootstrap interval (the prompts are resampled; text and visual
    cells share them, so the difference is paired). Returns ``{"text", "visual", "diff", "diff_ci", "cells"}``
    (KL in nats); ToolkitError when a pathway has no cell with per-prompt values."""
    boot = boot or Bootstrap()
    per_path, used = {}, 0
    for path in PATHS:
        rows = [r["kl_items"] for r in records if r["cell"].get("pathway") == path and "layer" in r["cell"]
                and (group is None or r["cell"]["group"] == group) and r.get("kl_items")]
        if not rows or len({len(row) for row in rows}) != 1:
            raise ToolkitError(f"no {path} cells{'' if group is None else f' of group {group!r}'} with per-prompt KL "
                               "of the same prompts among these map records")
        per_path[path], used = [sum(column) / len(rows) for column in zip(*rows)], used + len(rows)
    text, visual = per_path["text"], per_path["visual"]
    if len(text) != len(visual):
        raise ToolkitError("the text and visual cells of this map hold KL of different prompts")
    diff = [t - v for t, v in zip(text, visual)]
    interval = mean_interval(diff, f"map contrast {group or 'all'}", boot)
    return {"text": sum(text) / len(text), "visual": sum(visual) / len(visual), "diff": sum(diff) / len(diff),
            "diff_ci": interval.to_list(), "cells": used}
