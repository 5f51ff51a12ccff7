"""Calibration helpers: noise multiplier for a target (epsilon, delta)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from ._checks import check_delta, check_epsilon, check_sample_rate
from .analysis import gdp as gdp_analysis
from .registry import create_accountant

MAX_SIGMA = 1e4
MIN_SIGMA = 0.1


def _resolve_steps(sample_rate: float, epochs: Optional[float], steps: Optional[int]) -> int:
    if (epochs is None) == (steps is None):
        raise ValueError("pass exactly one of `epochs` or `steps`")
    if steps is None:
        if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"epochs={epochs!r} is invalid: it must be > 0")
        steps = int(round(epochs / sample_rate))
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: it must be an integer >= 1")
    return max(int(steps), 1)


def _gdp_guess(target_epsilon: float, target_delta: float, sample_rate: float, steps: int) -> float:
    """Noise multiplier from the CLT (closed form); a cheap starting point."""
    mu = gdp_analysis.mu_from_eps(target_epsilon, target_delta)
    if not math.isfinite(mu) or mu <= 0:
        return 1.0
    denom = math.log1p(mu * mu / (sample_rate * sample_rate * steps))
    return 1.0 / math.sqrt(denom) if denom > 0 else MAX_SIGMA


def get_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    epochs: Optional[float] = None,
    steps: Optional[int] = None,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    **kwargs: Any,
) -> float:
    """Noise multiplier sigma reaching (target_epsilon, target_delta).

    Returns sigma with ``target_epsilon - epsilon_tolerance <= eps(sigma) <= target_epsilon``
    for ``steps`` steps (or ``round(epochs / sample_rate)`` steps) at ``sample_rate``,
    measured with ``accountant`` ("prv", "rdp" or "gdp"; extra ``kwargs`` go to
    its ``get_epsilon``).  epsilon decreases with sigma, so a bracketed secant
    search on (log sigma, log epsilon) is used.

    Raises:
        ValueError: bad input, or a target that cannot be reached with
            ``MIN_SIGMA <= sigma <= MAX_SIGMA``.
    """
    target_epsilon = check_epsilon(target_epsilon)
    target_delta = check_delta(target_delta, name="target_delta")
    sample_rate = check_sample_rate(sample_rate)
    if not (isinstance(epsilon_tolerance, (int, float)) and epsilon_tolerance > 0):
        raise ValueError(f"epsilon_tolerance={epsilon_tolerance!r} is invalid: it must be > 0")
    n_steps = _resolve_steps(sample_rate, epochs, steps)
    acc = create_accountant(accountant)
    tol = min(float(epsilon_tolerance), 0.5 * target_epsilon)
    goal = target_epsilon - 0.5 * tol  # aim at the middle of the accepted band

    def eps_of(sigma: float) -> float:
        acc.history = [(sigma, sample_rate, n_steps)]
        return float(acc.get_epsilon(target_delta, **kwargs))

    def ok(e: float) -> bool:
        return target_epsilon - tol <= e <= target_epsilon

    return _solve_sigma(eps_of, ok, target_epsilon, goal, _gdp_guess(target_epsilon, target_delta, sample_rate, n_steps))


def _solve_sigma(
    eps_of: Callable[[float], float], ok: Callable[[float], bool], target: float, goal: float, guess: float
) -> float:
    sigma = min(max(guess, MIN_SIGMA), MAX_SIGMA)
    e = eps_of(sigma)
    if ok(e):
        return sigma
    # Bracket: lo has eps > target, hi has eps <= target.
    factor = 1.15
    if e > target:
        lo, e_lo = sigma, e
        while True:
            if sigma >= MAX_SIGMA:
                raise ValueError(
                    f"target_epsilon={target} is unreachable: even noise_multiplier={MAX_SIGMA:g} "
                    f"gives epsilon={e:.4g} > target (the target epsilon is too small)."
                )
            sigma = min(sigma * factor, MAX_SIGMA)
            factor = factor * factor
            e = eps_of(sigma)
            if ok(e):
                return sigma
            if e <= target:
                hi, e_hi = sigma, e
                break
            lo, e_lo = sigma, e
    else:
        hi, e_hi = sigma, e
        while True:
            if sigma <= MIN_SIGMA:
                raise ValueError(
                    f"target_epsilon={target} is unreachable in the supported range: even "
                    f"noise_multiplier={MIN_SIGMA:g} gives only epsilon={e:.4g} (target too large)."
                )
            sigma = max(sigma / factor, MIN_SIGMA)
            factor = factor * factor
            e = eps_of(sigma)
            if ok(e):
                return sigma
            if e > target:
                lo, e_lo = sigma, e
                break
            hi, e_hi = sigma, e
    # Illinois regula falsi on f(x) = log(eps) - log(goal), x = log(sigma).
    x_lo, x_hi = math.log(lo), math.log(hi)

    def f(eps: float) -> float:
        return math.log(max(eps, 1e-300)) - math.log(goal)

    f_lo, f_hi = f(e_lo), f(e_hi)
    side = 0
    for _ in range(100):
        if f_lo - f_hi > 0 and math.isfinite(f_lo) and math.isfinite(f_hi):
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        else:
            x = 0.5 * (x_lo + x_hi)
        if not (min(x_lo, x_hi) < x < max(x_lo, x_hi)):
            x = 0.5 * (x_lo + x_hi)
        sigma = math.exp(x)
        e = eps_of(sigma)
        if ok(e):
            return sigma
        if e > target:
            x_lo, f_lo = x, f(e)
            if side == -1:
                f_hi *= 0.5
            side = -1
        else:
            x_hi, f_hi = x, f(e)
            if side == 1:
                f_lo *= 0.5
            side = 1
        if abs(x_hi - x_lo) < 1e-12:
            break
    return math.exp(x_hi)  # eps(hi) <= target is guaranteed
