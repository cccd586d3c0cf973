"""Non-uniform sparsity at the same global budget: pure functions from per-layer values to prune counts.

An *allocation* gives each pruned Linear its own number of weights to prune, so that some layers (or
some projection groups) keep more and others less while the total stays the target:

- ``uniform`` (the default, and today's behaviour): every Linear prunes ``int(in * sparsity)`` weights
  per output row; nothing in this module runs.
- ``owl`` (outlier-weighted layer-wise sparsity, Yin et al. 2024): per decoder layer l, the outlier ratio
  D_l is the share of the Wanda scores |W|·‖X‖ of all the layer's Linears that exceed ``m`` times their
  mean (one mean over the whole layer). The D_l are mapped linearly onto [0, 2λ] (min -> 0, max -> 2λ)
  and S_l = S − (D'_l − mean D'): more outliers, less sparsity; the unweighted mean of the S_l is S.
- ``map``: the same rule per (layer, projection group), the value being the log of the group's
  sensitivity from a map written by ``atv probe --map`` (mean KL to the dense model when one layer's
  attention or FFN path is pruned): more sensitive, less sparsity. On a shared-weight model one weight
  serves both pathways, so a group's sensitivity is the sum of its text-path and visual-path KL (the
  first-order cost of pruning it for every token).

**The global budget.** OWL's rule keeps the *unweighted* mean of the S_l at S, which is the weighted
(per weight) global sparsity only when every layer (group) has the same size. Here every S_u is then
shifted by one constant c = S − Σ S_u N_u / Σ N_u (N_u: weights of unit u), which keeps the spread
and makes the weight-weighted mean exactly S (c = 0 when the units have equal sizes, so OWL's ratios are
unchanged there). Each Linear j of unit u is then given an integer count n_j close to S_u · numel_j by
largest remainders, so that Σ n_j = round(S · Σ numel_j): the global sparsity is the target within one
weight, and every Linear is within one weight of its own share. A Linear's count is spread over its rows
(:func:`pruning.masks.count_mask`), so allocations other than ``uniform`` prune exact counts per Linear.
N:M patterns fix the sparsity of every group of M weights and cannot be combined with an allocation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import ConfigError

ALLOCATIONS = ("uniform", "owl", "map")
GROUPS = ("attn", "ffn")  # the map's projection groups: token mixer (attention) and feed-forward
MAP_FILE = "sensitivity_map.json"
MAP_FORMAT = "atv-sensitivity-map"
_FFN_WORDS = ("mlp", "feed_forward", "ffn", "experts", "moe")
_LOG_FLOOR = 1e-6  # nats added before the log of a map's KL (a cell whose pruning changed nothing has KL 0)
KL_ROUNDING = 1e-7  # nats a map's KL (a mean of float sums) may fall below 0 by rounding; below that it is refused


def projection_group(name: str) -> str:
    """'ffn' for a projection inside the block's feed-forward (``mlp.up_proj``, ``mlp.experts.down_proj[3]``,
    ``feed_forward.w1``), else 'attn' (the token mixer: attention, linear attention, convolution)."""
    parents = name.split(".")[:-1]
    return "ffn" if any(word in part for part in parents for word in _FFN_WORDS) else "attn"


# -- OWL's statistic -----------------------------------------------------------------------------------
def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (the Wanda scores of one layer's Linears, any shapes) that exceed
    ``m`` times the mean over all of them. Sums in float64; no concatenated copy is made."""
    if not scores:
        raise ConfigError("outlier_ratio needs the scores of at least one Linear")
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / count
    return sum(int((s > threshold).sum()) for s in scores) / count


# -- from values to sparsities ------------------------------------------------------------------------
def spread(values: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL's rule: ``values`` mapped linearly onto [0, 2λ] (min -> 0, max -> 2λ), then
    S_i = target − (D'_i − mean D'); a higher value gets less sparsity. Equal values give ``target`` each."""
    low, high = min(values), max(values)
    if high == low:
        return [target] * len(values)
    scaled = [(v - low) / (high - low) * 2 * lam for v in values]
    mean = sum(scaled) / len(scaled)
    return [target - (d - mean) for d in scaled]


def match_budget(sparsities: Sequence[float], sizes: Sequence[int], target: float) -> list[float]:
    """``sparsities`` shifted by one constant so that their mean weighted by ``sizes`` is ``target``."""
    total = sum(sizes)
    shift = target - sum(s * n for s, n in zip(sparsities, sizes)) / total
    return [s + shift for s in sparsities]


def prune_counts(sparsities: Sequence[float], sizes: Sequence[int], target: float) -> list[int]:
    """Integer counts n_i with Σ n_i = round(target · Σ sizes), each within one of sparsities[i] · sizes[i]
    (largest remainders; ties to the earlier entry). ``sparsities`` must already meet the budget."""
    ideal = [s * n for s, n in zip(sparsities, sizes)]
    counts = [min(math.floor(x), n) for x, n in zip(ideal, sizes)]
    missing = round(target * sum(sizes)) - sum(counts)
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[:max(missing, 0)]:
        counts[i] = min(counts[i] + 1, sizes[i])
    for i in order[::-1][:max(-missing, 0)]:  # float error the other way round: take back from the smallest
        counts[i] -= 1
    return counts


# -- the plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """Targets that share one sparsity: a decoder layer (owl) or one projection group of it (map)."""

    layer: int
    group: str                 # 'all' (owl) or one of GROUPS (map)
    value: float               # higher = keep more: the outlier ratio (owl), the log sensitivity (map)
    sizes: dict[str, int]      # target name (relative to the block) -> number of weights


@dataclass
class Allocation:
    """Per pruned layer: target name -> weights to prune; and what each unit was given (for the report)."""

    kind: str
    target: float
    lam: float
    units: list[Unit]
    sparsities: list[float]                     # per unit, after the budget shift
    counts: dict[int, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the prune report."""
        return {"kind": self.kind, "target": self.target, "lambda": self.lam,
                "units": [{"layer": u.layer, "group": u.group, "value": u.value, "sparsity": s,
                           "weights": sum(u.sizes.values())} for u, s in zip(self.units, self.sparsities)]}


def allocate(kind: str, units: Sequence[Unit], target: float, lam: float) -> Allocation:
    """Spread ``target`` over ``units`` by OWL's rule (:func:`spread`), meet the weighted budget
    (:func:`match_budget`) and give every target an integer count (:func:`prune_counts`).

    Raises ConfigError naming the unit when a sparsity falls outside [0, 1)."""
    units = list(units)
    if not units:
        raise ConfigError(f"allocation {kind!r}: nothing to prune")
    sizes = [sum(u.sizes.values()) for u in units]
    sparsities = match_budget(spread([u.value for u in units], target, lam), sizes, target)
    for unit, s in zip(units, sparsities):
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"allocation {kind!r} gives layer {unit.layer} ({unit.group}) sparsity {s:.4f}, "
                              f"outside [0, 1) (target {target}, lambda {lam}); lower the allocation lambda or "
                              "move the target away from 0 and 1")
    names = [(u.layer, name, n, s) for u, s in zip(units, sparsities) for name, n in u.sizes.items()]
    counts = prune_counts([s for *_, s in names], [n for _, _, n, _ in names], target)
    plan: dict[int, dict[str, int]] = {}
    for (layer, name, _, _), count in zip(names, counts):
        plan.setdefault(layer, {})[name] = count
    return Allocation(kind, target, lam, units, sparsities, plan)


def owl_units(ratios: Mapping[int, float], sizes: Mapping[int, Mapping[str, int]]) -> list[Unit]:
    """One unit per pruned layer, valued by its outlier ratio."""
    return [Unit(i, "all", ratios[i], dict(sizes[i])) for i in sorted(sizes)]


def map_units(sensitivity: Mapping[tuple[int, str], float], sizes: Mapping[int, Mapping[str, int]]) -> list[Unit]:
    """One unit per (pruned layer, projection group with targets), valued by log(sensitivity + 1e-6): the most
    sensitive group gets the least sparsity. ConfigError names the (layer, group) pairs the map lacks."""
    grouped: dict[tuple[int, str], dict[str, int]] = {}
    for layer in sorted(sizes):
        for name, n in sizes[layer].items():
            grouped.setdefault((layer, projection_group(name)), {})[name] = n
    missing = [key for key in grouped if key not in sensitivity]
    if missing:
        raise ConfigError(f"the sensitivity map has no value for (layer, group) {missing[:6]} "
                          f"({len(missing)} in all); make the map over every layer and both groups")
    return [Unit(layer, group, math.log(sensitivity[(layer, group)] + _LOG_FLOOR), members)
            for (layer, group), members in grouped.items()]


# -- the map file --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SensitivityMap:
    """A map written by ``atv probe --map``: per (layer, pathway, group) the mean KL of pruning that cell."""

    num_layers: int
    sparsity: float
    kl: dict[tuple[int, str, str], float]     # (layer, path, group) -> mean KL(dense || pruned)

    def group_sensitivity(self) -> dict[tuple[int, str], float]:
        """(layer, group) -> KL summed over the pathways in the map (one shared weight serves all of them)."""
        out: dict[tuple[int, str], float] = {}
        for (layer, _path, group), value in self.kl.items():
            out[(layer, group)] = out.get((layer, group), 0.0) + value
        return out

    def to_json(self, extra: Mapping[str, Any] | None = None) -> str:
        cells = [{"layer": layer, "path": path, "group": group, "kl": value}
                 for (layer, path, group), value in sorted(self.kl.items())]
        return json.dumps({"format": MAP_FORMAT, "version": 1, "num_layers": self.num_layers,
                           "sparsity": self.sparsity, **dict(extra or {}), "cells": cells}, indent=1)


def read_sensitivity_map(path: str | Path) -> SensitivityMap:
    """The map in ``path`` (a ``sensitivity_map.json`` or the folder holding one); ConfigError naming the file
    when it is missing or not a map."""
    path = Path(path)
    if path.is_dir():
        path = path / MAP_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the sensitivity map {str(path)!r} ({type(err).__name__}); write one with "
                          "atv probe --map --out DIR and pass DIR or DIR/sensitivity_map.json") from None
    if not isinstance(data, dict) or data.get("format") != MAP_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a sensitivity map (no format {MAP_FORMAT!r}); write one with "
                          "atv probe --map")
    try:
        kl = {(int(c["layer"]), str(c["path"]), str(c["group"])): float(c["kl"]) for c in data["cells"]}
        found = SensitivityMap(int(data["num_layers"]), float(data["sparsity"]), kl)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"sensitivity map {str(path)!r} is malformed ({type(err).__name__}: {err})") from None
    for (layer, pathway, group), value in kl.items():
        if not math.isfinite(value) or value < -KL_ROUNDING:
            raise ConfigError(f"sensitivity map {str(path)!r}: cell (layer {layer}, path {pathway!r}, group "
                              f"{group!r}) has KL {value!r}, not a finite number >= 0 (a KL divergence is); remake "
                              "the map with atv probe --map")
    return found
