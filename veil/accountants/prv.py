"""Tight accountant based on privacy loss distributions (PRV / PLD accounting)."""

from __future__ import annotations

import math
import warnings
from typing import Optional

from ._checks import check_delta
from .accountant import IAccountant
from .analysis import pld as pld_analysis
from .analysis import rdp as rdp_analysis


class PRVAccountant(IAccountant):
    """Privacy-loss-distribution accountant (numerically tight, certified upper bound).

    The privacy loss distribution of every distinct (noise_multiplier,
    sample_rate) block is discretised pessimistically (connect-the-dots) for
    both add and remove neighbours, composed by FFT, and epsilon is read off
    with every truncation / round-off error charged to delta, so the value is an
    upper bound on the true epsilon.  If it cannot be certified the accountant
    warns and returns the (always valid, looser) RDP bound; it also never
    returns more than the RDP bound.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple, float] = {}

    def get_epsilon(  # type: ignore[override]
        self,
        delta: float,
        *,
        eps_error: float = 0.01,
        delta_error: Optional[float] = None,
        **kwargs,
    ) -> float:
        """Upper bound on epsilon for ``delta``.

        Args:
            delta: target delta in (0, 1).
            eps_error: tightness goal (absolute); the grid is chosen so that the
                discretisation bias stays below ``min(eps_error, 0.2% of epsilon)``.
            delta_error: part of ``delta`` reserved for truncation and round-off
                (default ``delta / 1000``, raised to ``delta / 100`` if round-off needs it).
        """
        delta = check_delta(delta)
        if not (isinstance(eps_error, (int, float)) and math.isfinite(eps_error) and eps_error > 0):
            raise ValueError(f"eps_error={eps_error!r} is invalid: it must be > 0 (range (0, inf)).")
        adaptive = delta_error is None
        if delta_error is None:
            delta_error = delta / 1000.0
        if not (0.0 < float(delta_error) < delta):
            raise ValueError(f"delta_error={delta_error!r} is invalid: it must be in the range (0, delta={delta}).")
        blocks = self._blocks()
        if not blocks:
            return 0.0
        key = (tuple(sorted(blocks)), delta, float(eps_error), float(delta_error), adaptive)
        if key in self._cache:
            return self._cache[key]
        eps = self._compute(blocks, delta, float(eps_error), float(delta_error), adaptive)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = eps
        return eps

    @staticmethod
    def _compute(
        blocks: list[tuple[float, float, int]], delta: float, eps_error: float, delta_error: float, adaptive: bool = False
    ) -> float:
        orders = rdp_analysis.DEFAULT_ALPHAS
        rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in blocks)
        eps_rdp, alpha = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        if eps_rdp == 0.0:
            return 0.0  # (0, delta)-DP already certified
        result = pld_analysis.pld_epsilon(
            blocks,
            delta,
            eps_error=eps_error,
            delta_error=delta_error,
            eps_hint=eps_rdp,
            lam_hint=max(alpha - 1.0, 1e-3),
        )
        if result.epsilon is None and adaptive and "round-off" in result.reason:
            # default delta_error: allow up to 1% of delta for round-off before giving up
            result = pld_analysis.pld_epsilon(
                blocks,
                delta,
                eps_error=eps_error,
                delta_error=delta / 100.0,
                eps_hint=eps_rdp,
                lam_hint=max(alpha - 1.0, 1e-3),
            )
        if result.epsilon is None or not math.isfinite(result.epsilon):
            warnings.warn(
                f"PRVAccountant could not certify a tight epsilon ({result.reason}); "
                f"falling back to the RDP bound epsilon={eps_rdp:.6g}.",
                RuntimeWarning,
                stacklevel=3,
            )
            return float(eps_rdp)
        return float(max(0.0, min(result.epsilon, eps_rdp)))

    @classmethod
    def mechanism(cls) -> str:
        return "prv"
