"""What to prune and how: one validated dataclass.

``method`` is a preset naming a registered scorer and a default calibration pool (:data:`METHODS`;
scorers and pools are registered in :mod:`pruning.registry`, so a new method is one registered
function and one line of the table):

=============  ===========  ============
method         scorer       default pool
=============  ===========  ============
magnitude      |W|          (none: no calibration)
wanda          Wanda        all
atv            Wanda        atv
sparsegpt      SparseGPT    all
tamp           Wanda        tamp
=============  ===========  ============

Any scorer that uses activations accepts any pool, e.g. ``PruneConfig("sparsegpt", pool="atv")``.
``allocation`` spreads the sparsity non-uniformly over layers (``owl``) or over layers and projection groups
(``map``) at the same global budget (:mod:`pruning.allocation`); ``uniform`` is the default.
How to run (offloading, pass schedule) is :class:`pruning.execution.ExecutionConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from . import pools, scores, sparsegpt, tamp  # noqa: F401  (they register the built-in scorers and pools)
from .adapters import DECODER_PROJ
from .allocation import ALLOCATIONS
from .errors import ConfigError
from .options import check_seed, option
from .registry import POOLS, get_pool, get_scorer, lookup

# method -> (scorer, default pool); None = the scorer uses no calibration data
METHODS: dict[str, tuple[str, str | None]] = {
    "magnitude": ("magnitude", None),
    "wanda": ("wanda", "all"),
    "atv": ("wanda", "atv"),
    "sparsegpt": ("sparsegpt", "all"),
    "tamp": ("wanda", "tamp"),
}


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); validates 0 < N < M."""
    if pattern is None or isinstance(pattern, tuple):
        nm = pattern
    else:
        try:
            n, m = (int(p) for p in str(pattern).split(":"))
        except ValueError:
            raise ConfigError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
        nm = (n, m)
    if nm is not None and not 0 < nm[0] < nm[1]:
        raise ConfigError(f"N:M pattern needs 0 < N < M, got {nm[0]}:{nm[1]}")
    return nm


@dataclass
class PruneConfig:
    method: str = option("atv", "preset naming a scorer and its default pool", choices=lambda: tuple(METHODS))
    sparsity: float | None = option(None, "fraction pruned per output row (default 0.5; N/M with --pattern)")
    pattern: str | None = option(None, "N:M semi-structured sparsity, e.g. 2:4 (default: unstructured)")
    pool: str | None = option(None, "calibration pool (default: the method's)", choices=lambda: tuple(POOLS))
    alpha: float = option(1.0, "ATV alpha rule: k = round(min(1, alpha * mean drift) * n_text)")
    visual_ratio: float | None = option(None, "ATV fixed rule instead of alpha: k = round(ratio * n_visual)")
    targets: tuple[str, ...] = option(DECODER_PROJ, "Linears to prune, relative to each decoder block")
    layers: tuple[int, ...] | None = option(None, "decoder layer indices to prune (default: all)")
    propagate: str = option("pruned", "next layer's inputs: outputs of the pruned or the dense layer",
                            choices=("pruned", "dense"))
    blocksize: int = option(128, "SparseGPT column block")
    percdamp: float = option(0.01, "SparseGPT dampening, fraction of the mean Hessian diagonal")
    seed: int = option(0, "seed of the random-visual pool")
    allocation: str = option("uniform", "sparsity per layer at the same global budget: the same everywhere, "
                                        "owl (outlier-weighted, from the dense Wanda scores), or map (per layer and "
                                        "attention/FFN group from --allocation-map)", choices=ALLOCATIONS)
    allocation_lambda: float = option(0.08, "owl/map: layer sparsities spread over 2*lambda around the target")
    owl_m: float = option(5.0, "owl: a Wanda score is an outlier above owl_m x its layer's mean")
    allocation_map: str | None = option(None, "map: sensitivity_map.json of atv probe --map (or its folder)")
    scorer: str = field(init=False)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise ConfigError(f"numbers must be finite, got {bad}")
        check_seed(self.seed)
        self._resolve_method()
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                                  f"(which prunes {implied:g}); pass sparsity={implied:g} or drop one")
            self.sparsity = implied
        elif self.sparsity is None:
            self.sparsity = 0.5
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.visual_ratio is not None and not 0.0 <= self.visual_ratio <= 1.0:
            raise ConfigError(f"visual_ratio must be in [0, 1], got {self.visual_ratio}")
        if self.visual_ratio is not None and self.pool not in ("atv", "random-visual"):
            raise ConfigError(f"visual_ratio is used only by the 'atv' and 'random-visual' pools, not {self.pool!r}; "
                              "drop visual_ratio or choose one of those")
        if self.propagate not in ("pruned", "dense"):
            raise ConfigError(f"propagate must be 'pruned' or 'dense', got {self.propagate!r}")
        self._check_targets()
        if self.blocksize < 1 or self.percdamp <= 0:
            raise ConfigError(f"blocksize must be >= 1 and percdamp > 0, got {self.blocksize}, {self.percdamp}")
        self._check_allocation(nm)

    def _check_targets(self) -> None:
        """At least one Linear name; none blank (``--targets ''`` would name the decoder block itself)."""
        names = [t for t in self.targets if isinstance(t, str) and t.strip()]
        if not names:
            got = "" if not self.targets else f" (got {list(self.targets)!r})"
            raise ConfigError(f"targets is empty{got}: name at least one Linear, e.g. 'mlp.down_proj'")
        if len(names) < len(self.targets):
            bad = next(t for t in self.targets if t not in names)
            raise ConfigError(f"targets holds {bad!r}, not a Linear name, in {list(self.targets)!r}; drop it")

    def _check_allocation(self, nm: tuple[int, int] | None) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation != "uniform" and nm is not None:
            raise ConfigError(f"allocation {self.allocation!r} cannot be combined with pattern {self.pattern} (N:M "
                              "fixes the sparsity of every group of M weights); drop one of them")
        if not 0.0 <= self.allocation_lambda < 0.5:
            raise ConfigError(f"allocation_lambda must be in [0, 0.5), got {self.allocation_lambda}")
        if self.owl_m <= 0:
            raise ConfigError(f"owl_m must be > 0, got {self.owl_m}")
        if (self.allocation == "map") != (self.allocation_map is not None):
            raise ConfigError(f"allocation 'map' needs allocation_map (and only it uses one), got allocation="
                              f"{self.allocation!r}, allocation_map={self.allocation_map!r}")
        if self.allocation_map is not None:
            self.allocation_map = str(self.allocation_map)

    def _resolve_method(self) -> None:
        """Scorer and pool from the method table; every name must be registered."""
        self.scorer, default_pool = lookup("method", self.method, METHODS)
        needs = get_scorer(self.scorer).needs
        if self.pool is not None and needs is None:
            raise ConfigError(f"method {self.method!r} uses no calibration data; drop pool={self.pool!r}")
        self.pool = default_pool if self.pool is None else self.pool
        if self.pool is not None:
            get_pool(self.pool)
        elif needs is not None:
            raise ConfigError(f"method {self.method!r}: scorer {self.scorer!r} needs calibration data, so the "
                              "method table must name a default pool")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        """The scorer uses activations, or the allocation does (owl's Wanda scores)."""
        return get_scorer(self.scorer).needs is not None or self.allocation == "owl"

    @property
    def needs_mean_drift(self) -> bool:
        """The alpha rule's k depends on the mean drift of all samples at the layer."""
        return self.pool is not None and get_pool(self.pool).needs_drift and self.visual_ratio is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
