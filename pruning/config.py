"""What to prune and how: one validated dataclass.

``method`` is a preset naming a scorer and a default calibration pool:

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapters import DECODER_PROJ
from .errors import ConfigError
from .options import option
from .pools import POOLS

METHODS = {"magnitude": ("magnitude", None), "wanda": ("wanda", "all"), "atv": ("wanda", "atv"),
           "sparsegpt": ("sparsegpt", "all"), "tamp": ("wanda", "tamp")}
SCHEDULES = ("auto", "two-pass", "three-pass")


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
    method: str = option("atv", "preset naming a scorer and its default pool", choices=tuple(METHODS))
    sparsity: float | None = option(None, "fraction pruned per output row (default 0.5; N/M with --pattern)")
    pattern: str | None = option(None, "N:M semi-structured sparsity, e.g. 2:4 (default: unstructured)")
    pool: str | None = option(None, "calibration pool (default: the method's)", choices=tuple(POOLS))
    alpha: float = option(1.0, "ATV alpha rule: k = round(min(1, alpha * mean drift) * n_text)")
    visual_ratio: float | None = option(None, "ATV fixed rule instead of alpha: k = round(ratio * n_visual)")
    targets: tuple[str, ...] = option(DECODER_PROJ, "Linears to prune, relative to each decoder block")
    layers: tuple[int, ...] | None = option(None, "decoder layer indices to prune (default: all)")
    propagate: str = option("pruned", "next layer's inputs: outputs of the pruned or the dense layer",
                            choices=("pruned", "dense"))
    offload_device: str | None = option(None, "where calibration activations live (default: CPU)")
    schedule: str = option("auto", "ATV alpha rule: stash activations (two-pass), recompute (three-pass), or "
                                   "choose by --stash-budget-gb", choices=SCHEDULES)
    stash_budget_gb: float = option(4.0, "'auto' schedule: two passes when the stash fits in this budget")
    blocksize: int = option(128, "SparseGPT column block")
    percdamp: float = option(0.01, "SparseGPT dampening, fraction of the mean Hessian diagonal")
    seed: int = option(0, "seed of the random-visual pool")
    offload: bool = option(False, "keep decoder layers on disk and load one at a time (memory bounded by one "
                                  "layer)")
    execution_device: str | None = option(None, "with --offload: where each layer runs (default: where it is)")
    scorer: str = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        self.scorer, default_pool = METHODS[self.method]
        bad = {k: v for k, v in vars(self).items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise ConfigError(f"numbers must be finite, got {bad}")
        if self.pool is None:
            self.pool = default_pool
        elif self.scorer == "magnitude":
            raise ConfigError(f"method 'magnitude' uses no calibration data; drop pool={self.pool!r}")
        elif self.pool not in POOLS:
            raise ConfigError(f"unknown pool {self.pool!r}; choose one of {list(POOLS)}")
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
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.targets:
            raise ConfigError("targets is empty: name at least one Linear, e.g. 'mlp.down_proj'")
        if self.blocksize < 1 or self.percdamp <= 0:
            raise ConfigError(f"blocksize must be >= 1 and percdamp > 0, got {self.blocksize}, {self.percdamp}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        return self.scorer != "magnitude"

    @property
    def needs_mean_drift(self) -> bool:
        """The alpha rule's k depends on the mean drift of all samples at the layer."""
        return self.pool in ("atv", "random-visual") and self.visual_ratio is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
