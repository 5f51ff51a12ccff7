r"""Gaussian DP (f-DP) via the central limit theorem (Bu, Dong, Long & Su, 2020).

``T`` steps of the Poisson-subsampled Gaussian with rate ``q`` and noise
multiplier ``sigma`` are approximately mu-GDP with
:math:`\mu = q\sqrt{T(e^{1/\sigma^2}-1)}`; blocks with different parameters
compose as :math:`\mu^2 = \sum_k \mu_k^2`.  mu-GDP implies (epsilon, delta)-DP with
:math:`\delta(\varepsilon) = \Phi(-\varepsilon/\mu+\mu/2) - e^\varepsilon\Phi(-\varepsilon/\mu-\mu/2)`.

This is an *approximation* (it can under-estimate epsilon, notably for few
steps or large q); prefer the PRV accountant for guarantees.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr


def mu_poisson(*, noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """CLT mu for Poisson sampling."""
    return sample_rate * math.sqrt(steps * math.expm1(noise_multiplier ** -2.0))


def mu_uniform(*, noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """CLT mu for sampling without replacement (fixed batch size)."""
    s = noise_multiplier
    inner = math.exp(s ** -2.0) * ndtr(1.5 / s) + 3.0 * ndtr(-0.5 / s) - 2.0
    return math.sqrt(2.0) * sample_rate * math.sqrt(steps * inner)


def delta_from_mu(eps: float, mu: float) -> float:
    """delta(eps) of mu-GDP, computed stably in log space."""
    if mu <= 0.0:
        return 0.0
    a = -eps / mu + mu / 2.0
    b = -eps / mu - mu / 2.0
    la, lb = float(log_ndtr(a)), float(log_ndtr(b))
    diff = eps + lb - la
    if diff >= 0.0:
        return 0.0
    return math.exp(la) * -math.expm1(diff)


def eps_from_mu(mu: float, delta: float) -> float:
    """Smallest eps >= 0 with delta(eps) <= delta for mu-GDP."""
    if mu <= 0.0 or delta_from_mu(0.0, mu) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while delta_from_mu(hi, mu) > delta:
        hi *= 2.0
        if hi > 1e7:
            return math.inf
    return float(brentq(lambda e: delta_from_mu(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def mu_from_eps(eps: float, delta: float) -> float:
    """Largest mu whose mu-GDP guarantee gives (eps, delta)."""
    lo, hi = 0.0, 1.0
    while delta_from_mu(eps, hi) < delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda m: delta_from_mu(eps, m) - delta, lo, hi, xtol=1e-14, rtol=1e-13))
