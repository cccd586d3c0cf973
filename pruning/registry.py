"""Registries of scorers and calibration pools: pure functions registered by name.

A **scorer** turns a weight (and the statistic it ``needs``) into importance scores; the engine makes
the mask with :func:`pruning.masks.mask_from_scores`::

    @register_scorer("magnitude", needs=None)      # fn(weight) -> scores (out, in)
    @register_scorer("wanda", needs="sq_norms")    # fn(weight, sq_norms) -> scores
    @register_scorer("sparsegpt", needs="hessian", updates_weights=True)
    # fn(weight, hessian, sparsity, nm, blocksize, percdamp) -> (new_weight, mask)

A **pool** chooses the token positions that feed the statistics::

    @register_pool("text")    # fn(visual, valid, drifts, params: PoolParams) -> (pool (B, T) bool, k per sample)
    @register_pool("tamp", needs_visual=True, needs_attention=True)
    # fn(outputs (N, D), visual (N,), attention (N,)) -> (N,) bool: per Linear and per sample

A method is a config class registered with its scorer and default pool (:func:`pruning.config.register_method`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import torch

from .errors import ConfigError
from .masks import mask_from_scores

STATISTICS = (None, "sq_norms", "hessian")  # what a scorer can need (see pruning.stats.ACCUMULATORS)

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable
    needs: str | None             # statistic of the inputs: None (weights only) | 'sq_norms' | 'hessian'
    updates_weights: bool = False  # fn returns (new_weight, mask) instead of scores

    def prune(self, weight: torch.Tensor, statistic: torch.Tensor | None, sparsity: float,
              nm: tuple[int, int] | None, count: int | None = None,
              **options: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mask (out, in) bool, True = pruned; the new weight or None) for one Linear.

        count: prune exactly this many weights of the Linear instead of ``sparsity`` per row (non-uniform
        allocations); a weight-updating scorer then receives it as its ``count`` keyword.
        options: keyword arguments only weight-updating scorers take (SparseGPT's blocksize, percdamp)."""
        if self.updates_weights:
            extra = {} if count is None else {"count": count}
            new_weight, mask = self.fn(weight, statistic, sparsity, nm, **extra, **options)
            return mask, new_weight
        scores = self.fn(weight) if self.needs is None else self.fn(weight, statistic)
        return mask_from_scores(scores, sparsity, nm, count), None


@dataclass(frozen=True)
class PoolParams:
    alpha: float = 1.0                     # ATV alpha rule
    ratio: float | None = None             # ATV fixed ratio (None = alpha rule)
    mean_drift: float | None = None        # mean visual drift of all samples at the layer (alpha rule)
    generator: torch.Generator | None = None  # seeded per layer (random pools)


@dataclass(frozen=True)
class Pool:
    name: str
    fn: Callable
    needs_visual: bool = False     # calibration data must hold visual tokens
    needs_drift: bool = False      # fn uses each token's drift through the dense block
    needs_attention: bool = False  # per-Linear selection from the layer's attention probabilities (eager attention)


SCORERS: dict[str, Scorer] = {}
POOLS: dict[str, Pool] = {}


def register_scorer(name: str, *, needs: str | None, updates_weights: bool = False) -> Callable[[F], F]:
    """Decorator: register ``fn`` as scorer ``name`` (the function is returned unchanged).

    A scorer maps a weight (out, in) and, if it needs one, a statistic of the inputs to scores of the same
    shape; the lowest scores are pruned. Add the method to ``pruning.config.METHODS`` to use it by name.

    Args:
        name: the scorer's name.
        needs: the statistic it reads: None (weights only), ``'sq_norms'`` (per input column, as Wanda) or
            ``'hessian'`` (as SparseGPT).
        updates_weights: ``fn`` returns ``(new_weight, mask)`` instead of scores (SparseGPT's OBS update).

    Returns:
        The decorator.

    Raises:
        ConfigError: ``needs`` is not one of the known statistics.
    """
    if needs not in STATISTICS:
        raise ConfigError(f"scorer {name!r}: needs must be one of {STATISTICS}, got {needs!r}")

    def register(fn: F) -> F:
        SCORERS[name] = Scorer(name, fn, needs, updates_weights)
        return fn
    return register


def register_pool(name: str, *, needs_visual: bool = False, needs_drift: bool = False,
                  needs_attention: bool = False) -> Callable[[F], F]:
    """Decorator: register ``fn`` as calibration pool ``name`` (the function is returned unchanged).

    A pool chooses which tokens of a calibration batch feed the statistics (padding never does).

    Args:
        name: the pool's name (``--pool NAME``).
        needs_visual: calibration data must hold visual tokens.
        needs_drift: ``fn`` reads each token's drift through the dense block (as ATV's pool).
        needs_attention: the selection is per Linear, from the layer's attention probabilities (eager
            attention; as TAMP's pool).

    Returns:
        The decorator.
    """
    def register(fn: F) -> F:
        POOLS[name] = Pool(name, fn, needs_visual, needs_drift, needs_attention)
        return fn
    return register


def lookup(kind: str, name: str, table: Mapping[str, object]):
    """``table[name]``, or a ConfigError naming the unknown ``kind`` and the valid choices."""
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]


def get_scorer(name: str) -> Scorer:
    return lookup("scorer", name, SCORERS)


def get_pool(name: str) -> Pool:
    return lookup("pool", name, POOLS)
