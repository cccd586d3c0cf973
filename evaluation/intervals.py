"""Percentile-bootstrap intervals over benchmark items: scores, retention paired with the dense model,
and paired differences of two cells. Pure numpy; no model, no records.

The rule: a benchmark's items are resampled with replacement (``resamples`` times, ``n`` of ``n`` items), a
statistic is computed on every resample, and the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of those values (numpy's linear interpolation). Everything compared on one benchmark -- a cell,
the dense model, a second cell -- is resampled with the *same* item indices (pairing: an item that every
model gets right or wrong adds no spread). Each benchmark has its own random stream,
``numpy.random.default_rng([seed, zlib.crc32(name)])``, so a benchmark's interval does not depend on which
other benchmarks sit beside it, and benchmarks are resampled independently of each other (stratified).

Per-item scores are in [0, 1] (:class:`evaluation.reports.ItemResult`); scores and retention are returned
in %, as the reports give them.

Example::

    boot = Bootstrap(seed=0)
    score_interval([1, 0, 1, 1], "digit", boot)                 # Interval(low=25.0, high=100.0)
    retention_intervals({"digit": cell}, {"digit": dense}, boot).mean
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DEFAULT_LEVEL = 0.95
DEFAULT_RESAMPLES = 2000
Scores = Sequence[float] | np.ndarray  # per-item scores in [0, 1], in the benchmark's item order


@dataclass(frozen=True, kw_only=True)
class Bootstrap:
    """How intervals are drawn: confidence ``level``, number of ``resamples``, ``seed`` of the streams."""

    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.level < 1.0 or not math.isfinite(self.level):
            raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {self.level}")
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 1:
            raise ValueError(f"resamples must be an integer >= 1 (e.g. {DEFAULT_RESAMPLES}), got {self.resamples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def to_dict(self) -> dict:
        return {"method": "percentile bootstrap over items", "level": self.level, "resamples": self.resamples,
                "seed": self.seed}


DEFAULT_BOOTSTRAP = Bootstrap()  # 95%, 2000 resamples, seed 0


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def to_list(self) -> list[float]:
        return [self.low, self.high]

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (e.g. 0 for a difference that separates)."""
        return value < self.low or value > self.high


@dataclass(frozen=True)
class Estimate:
    """A point value and its interval (None where the items do not define one)."""

    value: float
    interval: Interval | None


@dataclass(frozen=True)
class RetentionIntervals:
    per_benchmark: dict[str, Interval | None]   # None: the dense mean is 0 on every resample
    mean: Interval | None                       # the mean over the benchmarks (the paper's "Mean" column)


@dataclass(frozen=True)
class Differences:
    """A - B, paired on the same items: per benchmark in score points (%), and in mean retention points."""

    scores: dict[str, Estimate]
    mean_retention: Estimate | None             # None without dense items


# -- the draws --------------------------------------------------------------------------------------------
def bootstrap_indices(n: int, name: str, boot: Bootstrap) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement from benchmark ``name``'s own stream."""
    if n < 1:
        raise ValueError(f"benchmark {name!r} has no items to resample")
    rng = np.random.default_rng([boot.seed, zlib.crc32(name.encode("utf-8"))])
    return rng.integers(0, n, size=(boot.resamples, n))


def percentile_interval(values: np.ndarray, level: float) -> Interval | None:
    """The central ``level`` interval of the finite ``values`` (None when there is none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(low), float(high))


def _aligned(name: str, *columns: Scores) -> list[np.ndarray]:
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    if any(a.ndim != 1 for a in arrays) or len({a.size for a in arrays}) != 1:
        raise ValueError(f"benchmark {name!r}: paired item scores need the same items on both sides, got "
                         f"{[a.shape for a in arrays]}")
    if any(((a < 0) | (a > 1) | ~np.isfinite(a)).any() for a in arrays):
        raise ValueError(f"benchmark {name!r}: item scores must be in [0, 1]")
    return arrays


def resampled_means(name: str, boot: Bootstrap, *columns: Scores) -> list[np.ndarray]:
    """Per column, its mean over the items of every resample, (resamples,); all columns share the indices."""
    arrays = _aligned(name, *columns)
    index = bootstrap_indices(arrays[0].size, name, boot)
    return [a[index].mean(axis=1) for a in arrays]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """100 * numerator / denominator, NaN where the denominator is 0 (retention is undefined there)."""
    out = np.full(numerator.shape, np.nan)
    np.divide(100.0 * numerator, denominator, out=out, where=denominator > 0)
    return out


# -- the statistics -------------------------------------------------------------------------------------
def score_interval(scores: Scores, name: str, boot: Bootstrap = DEFAULT_BOOTSTRAP) -> Interval:
    """Interval of a benchmark's score (% of the mean item score) over its items."""
    (means,) = resampled_means(name, boot, scores)
    return percentile_interval(100.0 * means, boot.level)


def mean_interval(values: Sequence[float] | np.ndarray, name: str, boot: Bootstrap = DEFAULT_BOOTSTRAP) -> Interval:
    """Interval of the mean of any finite per-item ``values`` (e.g. a prompt's KL in nats, or its top-1 agreement
    in %), in their own unit; ``name`` picks the random stream, as a benchmark's name does."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.isfinite(array).all():
        raise ValueError(f"{name!r}: per-item values must be a finite 1-D sequence, got shape {array.shape}")
    index = bootstrap_indices(array.size, name, boot)
    return percentile_interval(array[index].mean(axis=1), boot.level)


def _retention_draws(cell: Mapping[str, Scores], dense: Mapping[str, Scores], boot: Bootstrap) -> dict[str, np.ndarray]:
    """Per benchmark of ``cell``: retention (%) on every resample, cell and dense on the same items."""
    missing = sorted(set(cell) - set(dense))
    if missing:
        raise ValueError(f"retention intervals need the dense items of {missing}")
    draws = {}
    for name in cell:
        pruned, reference = resampled_means(name, boot, cell[name], dense[name])
        draws[name] = _ratio(pruned, reference)
    return draws


def retention_intervals(cell: Mapping[str, Scores], dense: Mapping[str, Scores],
                        boot: Bootstrap = DEFAULT_BOOTSTRAP) -> RetentionIntervals:
    """Retention = cell mean / dense mean x 100, per benchmark of ``cell`` and averaged over them, with the
    cell's and the dense model's items resampled together. A resample whose dense mean is 0 has no retention
    and is left out (of that benchmark, and of the mean)."""
    if not cell:
        raise ValueError("retention intervals need at least one benchmark, got none")
    draws = _retention_draws(cell, dense, boot)
    per = {name: percentile_interval(values, boot.level) for name, values in draws.items()}
    mean = np.mean(np.stack(list(draws.values())), axis=0)  # NaN where any benchmark is undefined
    return RetentionIntervals(per, percentile_interval(mean, boot.level))


def paired_differences(a: Mapping[str, Scores], b: Mapping[str, Scores], dense: Mapping[str, Scores] | None = None,
                       boot: Bootstrap = DEFAULT_BOOTSTRAP) -> Differences:
    """A - B on the benchmarks both have, resampling the same items for A, B (and the dense model).

    scores: per benchmark, mean(A) - mean(B) in score points (%); mean_retention: the difference of the
    two cells' mean retention (%) over those of them whose dense items are given and average above 0
    (None when there is none)."""
    shared = [name for name in a if name in b]
    if not shared:
        raise ValueError(f"the two cells share no benchmark ({sorted(a)} vs {sorted(b)})")
    scores = {}
    for name in shared:
        mean_a, mean_b = resampled_means(name, boot, a[name], b[name])
        point = 100.0 * (float(np.mean(a[name])) - float(np.mean(b[name])))
        scores[name] = Estimate(point, percentile_interval(100.0 * (mean_a - mean_b), boot.level))
    return Differences(scores, _retention_difference(a, b, dense, shared, boot))


def _retention_difference(a, b, dense, shared: list[str], boot: Bootstrap) -> Estimate | None:
    """Mean retention of A minus that of B over the shared benchmarks the dense model scores above 0."""
    defined = [n for n in shared if dense is not None and n in dense and float(np.mean(dense[n])) > 0]
    if not defined:
        return None
    draws, points = [], []
    for name in defined:
        mean_a, mean_b, mean_dense = resampled_means(name, boot, a[name], b[name], dense[name])
        draws.append(_ratio(mean_a, mean_dense) - _ratio(mean_b, mean_dense))
        points.append(100.0 * (np.mean(a[name]) - np.mean(b[name])) / np.mean(dense[name]))
    return Estimate(float(np.mean(points)), percentile_interval(np.mean(np.stack(draws), axis=0), boot.level))


__all__ = ["Bootstrap", "DEFAULT_BOOTSTRAP", "DEFAULT_LEVEL", "DEFAULT_RESAMPLES", "Differences", "Estimate",
           "Interval", "RetentionIntervals", "bootstrap_indices", "paired_differences", "percentile_interval",
           "resampled_means", "retention_intervals", "score_interval"]
