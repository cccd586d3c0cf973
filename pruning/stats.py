"""Calibration statistics: small fp32 accumulators with ``add`` and ``result``.

Each ``add`` call is one calibration sample (or ``samples`` of them in a batch) and weighs the
same whatever its token count, as in the Wanda and ATV reference code (running mean over
samples of the per-sample sum over tokens).
"""

from __future__ import annotations

import torch

from .scores import STATS_DTYPE


class SquaredNorms:
    """Mean over samples of sum_t x_tj^2 for each input feature j (Wanda's ||X_j||^2)."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.total = torch.zeros(features, dtype=STATS_DTYPE, device=device)
        self.samples = 0

    def add(self, rows: torch.Tensor, samples: int = 1) -> None:
        """rows: (N, features) activations of the pooled tokens of ``samples`` samples."""
        x = rows.to(device=self.total.device, dtype=STATS_DTYPE)
        self.total += x.pow(2).sum(dim=0)
        self.samples += samples

    def result(self) -> torch.Tensor:
        return self.total / max(self.samples, 1)


class Hessian:
    """Mean over samples of 2 * X^T X (SparseGPT's layer Hessian), fp32, (features, features).

    ``result()`` returns one tensor until the next ``add``: the Linears sharing this accumulator (q/k/v) get
    the same Hessian tensor, whose inverse SparseGPT then computes once
    (:func:`pruning.sparsegpt.shared_inverse_factor`)."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.total = torch.zeros(features, features, dtype=STATS_DTYPE, device=device)
        self.samples = 0
        self._mean: tuple[tuple[int, int, int], torch.Tensor] | None = None  # (versions and samples, mean)

    def add(self, rows: torch.Tensor, samples: int = 1) -> None:
        x = rows.to(device=self.total.device, dtype=STATS_DTYPE)
        self.total.addmm_(x.T, x, alpha=2.0)
        self.samples += samples
        self._mean = None

    def result(self) -> torch.Tensor:
        if self.total.is_inference():  # no version counters to check a kept mean against
            return self.total / max(self.samples, 1)
        if self._mean is None or self._mean[0] != (self.total._version, self.samples, self._mean[1]._version):
            mean = self.total / max(self.samples, 1)
            self._mean = ((self.total._version, self.samples, mean._version), mean)
        return self._mean[1]


ACCUMULATORS = {"sq_norms": SquaredNorms, "hessian": Hessian}  # a scorer's ``needs`` -> its accumulator
