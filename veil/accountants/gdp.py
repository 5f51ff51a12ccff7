"""Gaussian-DP accountant (central limit theorem approximation)."""

from __future__ import annotations

import math

from ._checks import check_delta
from .accountant import IAccountant
from .analysis import gdp as gdp_analysis


class GaussianAccountant(IAccountant):
    """mu-GDP accounting via the CLT: mu = q * sqrt(T * (exp(1/sigma^2) - 1)).

    Mixed histories compose as mu^2 = sum_k mu_k^2.  This is an approximation
    and can *under*-estimate epsilon (few steps, large q): use
    :class:`~veil.accountants.PRVAccountant` when a guarantee is needed.
    """

    def __init__(self) -> None:
        super().__init__()

    def get_mu(self, poisson: bool = True) -> float:
        """Total mu of the history (``poisson=False``: sampling without replacement)."""
        mu_fn = gdp_analysis.mu_poisson if poisson else gdp_analysis.mu_uniform
        total = 0.0
        for sigma, q, n in self._blocks():
            total += mu_fn(noise_multiplier=sigma, sample_rate=q, steps=n) ** 2
        return math.sqrt(total)

    def get_epsilon(self, delta: float, poisson: bool = True, **kwargs) -> float:  # type: ignore[override]
        """Epsilon of the CLT mu-GDP guarantee for ``delta``."""
        delta = check_delta(delta)
        return gdp_analysis.eps_from_mu(self.get_mu(poisson), delta)

    @classmethod
    def mechanism(cls) -> str:
        return "gdp"
