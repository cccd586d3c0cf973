"""How to run a pruning job: one validated dataclass, apart from :class:`~pruning.config.PruneConfig`
(what to prune). None of these settings changes a mask; they trade memory for time.

    prune_(model, PruneConfig("atv"), batches, execution=ExecutionConfig(offload=True))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import ConfigError
from .options import check_fields, option, parse_device

SCHEDULES = ("auto", "two-pass", "three-pass")


@dataclass
class ExecutionConfig:
    """How a prune runs (where layers and activations live, how many passes); masks do not depend on it.

    Args:
        offload: keep decoder layers on disk and load one at a time (memory bounded by about one layer).
        execution_device: with ``offload``: where each layer runs (default: where it is).
        offload_device: where calibration activations live between layers (default: cpu).
        schedule: ATV's alpha rule: ``two-pass`` stashes the dense pass's activations, ``three-pass`` runs an
            extra drift pass, ``auto`` picks two-pass when the stash fits ``stash_budget_gb``.
        stash_budget_gb: the ``auto`` schedule's budget for the stash, in GB.

    Raises:
        ConfigError: a bad value, named with the fix (e.g. ``execution_device`` without ``offload``).
    """
    offload: bool = option(False, "keep decoder layers on disk and load one at a time (memory bounded by one "
                                  "layer; accelerate hooks unless the model is already dispatched)")
    execution_device: str | None = option(None, "with --offload: where each layer runs (default: where it is)")
    offload_device: str | None = option(None, "where calibration activations live between layers "
                                              "(default: cpu)")
    schedule: str = option("auto", "ATV alpha rule: stash the dense pass's activations (two-pass), run an "
                                   "extra drift pass (three-pass), or choose by --stash-budget-gb",
                           choices=SCHEDULES)
    stash_budget_gb: float = option(4.0, "'auto' schedule: two passes when the stash fits in this budget",
                                    within=">= 0")

    def __post_init__(self) -> None:
        check_fields(self)
        parse_device("execution_device", self.execution_device)
        parse_device("offload_device", self.offload_device)
        if self.execution_device is not None and not self.offload:
            raise ConfigError(f"execution_device={self.execution_device!r} only applies with offload=True; "
                              "pass offload=True or drop execution_device")

    @property
    def activations_device(self) -> torch.device:
        """Where captured calibration activations are kept between layers."""
        return parse_device("offload_device", self.offload_device) or torch.device("cpu")

    @property
    def layer_device(self) -> torch.device | None:
        """With offload: the device each decoder layer runs on (None = where it is now)."""
        return parse_device("execution_device", self.execution_device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
