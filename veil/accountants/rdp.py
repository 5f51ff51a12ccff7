"""Rényi-DP accountant for DP-SGD (Poisson-subsampled Gaussian)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._checks import check_delta
from .accountant import IAccountant
from .analysis import rdp as rdp_analysis


class RDPAccountant(IAccountant):
    """Rényi DP accounting with the improved RDP -> (epsilon, delta) conversion.

    Exact RDP for integer and fractional orders; ``DEFAULT_ALPHAS`` is the usual
    grid plus orders near 1 (large epsilon) and large orders (tiny delta).
    """

    DEFAULT_ALPHAS: list[float] = rdp_analysis.DEFAULT_ALPHAS

    def __init__(self) -> None:
        super().__init__()

    def get_rdp(self, alphas: Optional[Sequence[float]] = None) -> np.ndarray:
        """RDP of the whole history at ``alphas`` (mixed histories add up)."""
        orders = list(self.DEFAULT_ALPHAS if alphas is None else alphas)
        total = np.zeros(len(orders))
        for sigma, q, n in self._blocks():
            total = total + rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders)
        return total

    def get_privacy_spent(self, *, delta: float, alphas: Optional[Sequence[float]] = None) -> tuple[float, float]:
        """Return ``(epsilon, best_alpha)`` for ``delta``."""
        delta = check_delta(delta)
        orders = list(self.DEFAULT_ALPHAS if alphas is None else alphas)
        if not self._blocks():
            return 0.0, float(orders[0])
        eps, best = rdp_analysis.get_privacy_spent(orders=orders, rdp=self.get_rdp(orders), delta=delta)
        return float(eps), float(best)

    def get_epsilon(self, delta: float, alphas: Optional[Sequence[float]] = None, **kwargs) -> float:  # type: ignore[override]
        """Epsilon spent so far for ``delta`` (minimised over ``alphas``)."""
        eps, _ = self.get_privacy_spent(delta=delta, alphas=alphas)
        return eps

    @classmethod
    def mechanism(cls) -> str:
        return "rdp"
