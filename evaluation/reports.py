"""Returned results: per item, per benchmark, per evaluation, and retention against a dense model.

Every report is a dataclass with ``to_dict()`` giving plain JSON-serialisable values.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .benchmarks import KINDS

log = logging.getLogger(__name__)


@dataclass
class ItemResult:
    """One item's outcome.

    Args:
        id: the item's id.
        prediction: the chosen option (choice), the generated text (open), None (fidelity).
        score: in [0, 1]: correct or not (choice), VQA accuracy (open), top-1 agreement (fidelity).
        details: e.g. ``{"logprobs": [...]}`` per option (choice), ``{"kl": ...}`` (fidelity).
    """

    id: str
    prediction: str | None
    score: float
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"item {self.id!r}: score must be in [0, 1], got {self.score}")


@dataclass
class BenchmarkResult:
    """One benchmark's score.

    Args:
        name: the benchmark's name.
        kind: ``'choice'``, ``'open'`` or ``'fidelity'``.
        n: items scored.
        score: % correct (choice), % VQA accuracy (open), % top-1 agreement with the dense model (fidelity).
        chance: % expected from uniform guessing (choice: mean of 100 / number of options), else None.
        metrics: further numbers, e.g. ``{"kl": mean KL(dense || model)}`` for fidelity.
        items: per-item results when asked for (``return_items=True``), else None.
    """

    name: str
    kind: str
    n: int
    score: float
    chance: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    items: list[ItemResult] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.n < 1:
            raise ValueError(f"benchmark {self.name!r}: n must be >= 1, got {self.n}")
        if not 0.0 <= self.score <= 100.0:
            raise ValueError(f"benchmark {self.name!r}: score must be a percentage in [0, 100], got {self.score}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    """All benchmarks of one evaluation, in the order they were given.

    Args:
        results: one result per benchmark.
        seed: the evaluation's seed.
    """

    results: list[BenchmarkResult]
    seed: int = 0

    def __post_init__(self) -> None:
        names = [r.name for r in self.results]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique in a report, got {names}")

    def scores(self) -> dict[str, float]:
        """Benchmark name -> score (%)."""
        return {r.name: r.score for r in self.results}

    def __getitem__(self, name: str) -> BenchmarkResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no benchmark {name!r} in this report; have {[r.name for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "results": [r.to_dict() for r in self.results]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


@dataclass
class RetentionReport:
    """Pruned score / dense score x 100 per benchmark, and their mean (the paper's "Mean" column).

    Args:
        per_benchmark: benchmark name -> retention (%).
        mean: the mean of ``per_benchmark``.
    """

    per_benchmark: dict[str, float]
    mean: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scores(report: EvalReport | Mapping[str, float]) -> dict[str, float]:
    return report.scores() if isinstance(report, EvalReport) else dict(report)


def retention(pruned: EvalReport | Mapping[str, float], dense: EvalReport | Mapping[str, float]) -> RetentionReport:
    """Retention (%) of the pruned model's scores relative to the dense model's, benchmark by benchmark.

    >>> retention({"a": 30.0, "b": 45.0}, {"a": 60.0, "b": 50.0}).to_dict()
    {'per_benchmark': {'a': 50.0, 'b': 90.0}, 'mean': 70.0}

    Args:
        pruned: the pruned model's report, or ``{name: score}``.
        dense: the dense model's report, or ``{name: score}``, over the same benchmarks.

    Returns:
        Retention per benchmark and their mean.
    """
    pruned_scores, dense_scores = _scores(pruned), _scores(dense)
    if set(pruned_scores) != set(dense_scores):
        raise ValueError(f"retention needs the same benchmarks on both sides, got {sorted(pruned_scores)} "
                         f"(pruned) and {sorted(dense_scores)} (dense)")
    if not dense_scores:
        raise ValueError("retention needs at least one benchmark, got none")
    zero = [name for name, score in dense_scores.items() if score <= 0 or not math.isfinite(score)]
    if zero:
        raise ValueError(f"retention is undefined where the dense score is not positive: {zero} "
                         f"({[dense_scores[n] for n in zero]})")
    per = {name: 100.0 * pruned_scores[name] / dense_scores[name] for name in dense_scores}
    return RetentionReport(per_benchmark=per, mean=sum(per.values()) / len(per))


def defined_retention(pruned: Mapping[str, float], dense: Mapping[str, float]) -> RetentionReport | None:
    """:func:`retention` over the benchmarks it is defined on: those of ``pruned`` that ``dense`` scores
    above 0 (the rest are named in a warning).

    >>> defined_retention({"a": 30.0, "b": 5.0, "c": 1.0}, {"a": 60.0, "b": 0.0}).to_dict()
    {'per_benchmark': {'a': 50.0}, 'mean': 50.0}

    Args:
        pruned: ``{name: score}`` of the pruned model.
        dense: ``{name: score}`` of the dense model.

    Returns:
        The retention over the defined benchmarks, or None when there is none.
    """
    shared = [name for name in pruned if dense.get(name, 0) > 0 and math.isfinite(dense[name])]
    skipped = sorted(set(pruned) - set(shared))
    if skipped:
        log.warning("no retention for %s (missing from the dense results, or dense score 0)", skipped)
    if not shared:
        return None
    return retention({n: pruned[n] for n in shared}, {n: dense[n] for n in shared})
