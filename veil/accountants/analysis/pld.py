r"""Tight (epsilon, delta) accounting for the Poisson-subsampled Gaussian via
privacy loss distributions (PLDs) composed by FFT.

Outline of :func:`pld_epsilon`
------------------------------
1. **Discretisation (pessimistic).**  For every distinct (sigma, q) block and for
   both neighbouring directions ("remove": P = (1-q)N(0,s^2)+qN(1,s^2) vs
   Q = N(0,s^2); "add": the pair swapped) the privacy loss is put on the grid
   ``l_j = j*h`` with the *connect-the-dots* construction: the P-mass of every
   interval [l_j, l_{j+1}] is split between its two end points so that the
   Q-mass is preserved as well.  Because the hockey-stick curve delta(eps) is
   convex in e^eps, the discrete pair *dominates* the true one for every eps,
   so every composition of discrete pairs dominates the true composition.
   Mass beyond the grid is moved up (lower tail) or to +infinity (upper tail),
   which is pessimistic too.  The bias of this construction is second order in
   h, and h is chosen from the number of steps so that it stays below
   ``eps_error``.
2. **Composition by FFT with exponential tilting.**  The discrete PLDs are tilted
   by e^{lambda*l} (lambda = saddle point for the requested delta), raised to
   their step counts in Fourier space, multiplied and transformed back, then
   untilted.  Tilting makes the region that decides delta the centre of the
   computed distribution, so round-off stays relative (this is what keeps
   delta = 1e-12 with 10^6 steps accurate).
3. **Rigorous window.**  The FFT is cyclic.  The window is chosen with Chernoff
   bounds computed from the *discrete* moment generating function
   K(lambda) = sum_k T_k log E[e^{lambda L_k}]: mass that would wrap around is
   either bounded and charged to delta (mass above the window) or can only
   increase the computed delta (all other aliasing), so the result stays an
   upper bound.  A conservative round-off estimate is charged to delta as well.
4. **epsilon from delta.**  delta(eps) of a discrete PLD is piecewise linear in
   e^eps between grid points; it is evaluated with a stable recursion and
   inverted exactly.

All bounds are combined pessimistically; when a value cannot be certified the
caller gets ``None`` together with a reason (the accountant then falls back to
RDP and warns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.fft import irfft, next_fast_len, rfft
from scipy.signal import lfilter
from scipy.special import ndtr, ndtri

_U = float(np.finfo(np.float64).eps)
MAX_FFT_SIZE = 1 << 21
MAX_SINGLE_GRID = 4_000_000


# ----------------------------------------------------------------------------
# Single-step discretisation
# ----------------------------------------------------------------------------


def _interval_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Standard normal mass of [a, b] (a <= b), accurate in both tails."""
    with np.errstate(invalid="ignore"):
        upper = ndtr(-a) - ndtr(-b)
        lower = ndtr(b) - ndtr(a)
    return np.maximum(np.where(a > 0, upper, lower), 0.0)


@dataclass
class DiscretePLD:
    """P-masses ``pmf[i]`` at losses ``(lo + i) * h`` plus ``p_inf`` at +infinity."""

    lo: int
    h: float
    pmf: np.ndarray
    p_inf: float

    def losses(self) -> np.ndarray:
        return (self.lo + np.arange(len(self.pmf))) * self.h

    def log_mgf(self, lams: np.ndarray) -> np.ndarray:
        """log E[e^{lam*L}; L finite] for every lam in ``lams``."""
        nz = self.pmf > 0
        logp = np.log(self.pmf[nz])
        idx = (self.lo + np.flatnonzero(nz)).astype(np.float64)
        out = np.empty(len(lams))
        for i, lam in enumerate(lams):
            v = logp + (lam * self.h) * idx
            m = float(np.max(v))
            out[i] = m + math.log(float(np.sum(np.exp(v - m))))
        return out


def _loss_to_x(loss: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """Inverse of L(x) = log(1 - q + q*exp((2x-1)/(2 sigma^2))); -inf below log(1-q)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.expm1(loss) + q
        x = sigma * sigma * (np.log(np.maximum(inner, 0.0)) - math.log(q)) + 0.5
    return np.where(inner > 0, x, -np.inf)


def _x_to_loss(x: float, sigma: float, q: float) -> float:
    w = (2.0 * x - 1.0) / (2.0 * sigma * sigma)
    if q == 1.0:
        return w
    return float(np.logaddexp(math.log1p(-q), math.log(q) + w))


def _connect_dots(
    lo: int, h: float, p_bins: np.ndarray, q_bins: np.ndarray, p_bottom: float, p_top: float, q_top: float
) -> DiscretePLD:
    """Split interval masses onto grid points (connect-the-dots).

    ``p_bins[i], q_bins[i]``: P- and Q-mass of losses in [l_i, l_{i+1}]
    (i = 0..n-2, l_i = (lo+i)h); ``p_bottom``: P-mass below l_0; ``p_top``,
    ``q_top``: masses above l_{n-1}.
    """
    n = len(p_bins) + 1
    eps = (lo + np.arange(n)) * h
    t_left = np.exp(eps[:-1])
    dt = t_left * math.expm1(h)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = (p_bins / q_bins - t_left) / dt
    # A bin without Q-mass (underflow) sends its P-mass to the upper end point.
    theta = np.where(q_bins > 0, np.clip(np.nan_to_num(theta, nan=1.0), 0.0, 1.0), 1.0)
    to_upper = np.where(q_bins > 0, theta * q_bins * (t_left + dt), p_bins)
    to_lower = np.where(q_bins > 0, (1.0 - theta) * q_bins * t_left, 0.0)
    pmf = np.zeros(n)
    pmf[:-1] += to_lower
    pmf[1:] += to_upper
    pmf[0] += p_bottom
    t_top = math.exp(eps[-1])
    pmf[-1] += min(t_top * q_top, p_top)
    p_inf = max(p_top - t_top * q_top, 0.0)
    return DiscretePLD(lo=lo, h=h, pmf=pmf, p_inf=p_inf)


def discretize(sigma: float, q: float, h: float, direction: str, tail: float) -> DiscretePLD:
    """Pessimistic discrete PLD of one step of the subsampled Gaussian.

    ``direction`` is "remove" (P = mixture, Q = N(0, s^2)) or "add" (swapped);
    ``tail`` bounds the probability mass moved up/off the grid at either end.
    """
    z_tail = -float(ndtri(tail))
    x_top = 1.0 + sigma * z_tail  # both N(0,s^2) and N(1,s^2) have < tail mass above
    x_bot = -sigma * z_tail  # ... and below this
    if direction == "remove":
        l_hi = _x_to_loss(x_top, sigma, q)
        l_lo = _x_to_loss(x_bot, sigma, q)
    elif direction == "add":
        l_hi = -_x_to_loss(x_bot, sigma, q)
        l_lo = -_x_to_loss(x_top, sigma, q)
    else:  # pragma: no cover - internal
        raise ValueError(direction)
    lo = math.floor(l_lo / h)
    hi = max(math.ceil(l_hi / h), lo + 1)
    if hi - lo + 1 > MAX_SINGLE_GRID:
        raise _GridTooLarge(f"single-step grid of {hi - lo + 1} points")
    eps = (lo + np.arange(hi - lo + 1)) * h
    if direction == "remove":
        x = _loss_to_x(eps, sigma, q)  # increasing
        xb = np.concatenate([[-np.inf], x, [np.inf]])
        a, b = xb[:-1], xb[1:]
        m0 = _interval_mass(a / sigma, b / sigma)  # N(0, s^2) = Q
        m1 = _interval_mass((a - 1.0) / sigma, (b - 1.0) / sigma)  # N(1, s^2)
        qm, pm = m0, (1.0 - q) * m0 + q * m1
    else:
        x = _loss_to_x(-eps, sigma, q)  # decreasing in eps
        xb = np.concatenate([[np.inf], x, [-np.inf]])
        a, b = xb[1:], xb[:-1]
        m0 = _interval_mass(a / sigma, b / sigma)
        m1 = _interval_mass((a - 1.0) / sigma, (b - 1.0) / sigma)
        pm, qm = m0, (1.0 - q) * m0 + q * m1
    # pm[0]: below the grid, pm[1:-1]: the n-1 intervals, pm[-1]: above the grid
    return _connect_dots(lo, h, pm[1:-1], qm[1:-1], float(pm[0]), float(pm[-1]), float(qm[-1]))


# ----------------------------------------------------------------------------
# Composition and epsilon
# ----------------------------------------------------------------------------


class _GridTooLarge(Exception):
    pass


class _Uncertified(Exception):
    pass


@dataclass
class PLDResult:
    epsilon: float | None  # None: could not certify (reason says why)
    reason: str = ""
    grid_step: float = 0.0
    fft_size: int = 0
    tilt: float = 0.0


def _log_hockey_const(lam: np.ndarray) -> np.ndarray:
    """log max_x (1 - e^{-x}) e^{-lam x} = lam log(lam/(1+lam)) - log(1+lam)."""
    return lam * np.log(lam / (1.0 + lam)) - np.log1p(lam)


def _epsilon_one_direction(
    plds: list[DiscretePLD],
    counts: list[int],
    delta: float,
    delta_error: float,
    lam_hint: float,
    eps_floor: float = -math.inf,
) -> tuple[float, int, float]:
    """Epsilon of one direction, or ``eps_floor`` if delta(eps_floor) <= delta is
    already certified by the Chernoff bound.  Returns (eps, fft size, tilt)."""
    h = plds[0].h
    t_total = float(sum(counts))
    # Mass at +infinity of the composition (exact, pessimistic).
    p_inf = -math.expm1(sum(c * math.log1p(-p.p_inf) for p, c in zip(plds, counts)))
    target = delta - delta_error
    if p_inf >= target:
        raise _Uncertified("mass at infinity exceeds delta")

    # Cumulant generating function of the finite part on a lambda grid.
    lams = lam_hint * 2.0 ** (np.arange(-18, 19) / 3.0)
    kgrid = np.zeros(len(lams))
    for p, c in zip(plds, counts):
        kgrid += c * p.log_mgf(lams)
    budget = target - p_inf
    # Chernoff-type upper bound on epsilon: delta <= p_inf + e^{K - lam eps} c(lam)
    eps_ch = (kgrid + _log_hockey_const(lams) - math.log(budget)) / lams
    i_t = int(np.argmin(eps_ch))
    if eps_ch[i_t] <= eps_floor:
        return eps_floor, 0, float(lams[i_t])
    lam = float(lams[i_t])
    eps_upper = float(eps_ch[i_t])
    k_lam = float(kgrid[i_t])

    # Tilted block distributions: mean and variance of the composition.
    tilted = []
    mean_t, var_t = 0.0, 0.0
    for p, c in zip(plds, counts):
        loss = p.losses()
        with np.errstate(divide="ignore"):
            lw = np.log(p.pmf) + lam * loss
        m = float(np.max(lw))
        w = np.exp(lw - m)
        w /= w.sum()
        mu = float(np.dot(w, loss))
        var = float(np.dot(w, (loss - mu) ** 2))
        tilted.append(w)
        mean_t += c * mu
        var_t += c * var
    sd_t = math.sqrt(var_t)

    # Window [A, A + W) on the loss axis.
    eta_hi = 0.25 * delta_error  # mass lost above the window (charged to delta)
    eta_alias = 1e-3 * delta_error  # aliasing into the region used (only inflates delta)
    top_min = float(np.min((kgrid - math.log(eta_hi)) / lams))
    # Mass above the window re-enters at the bottom amplified by e^{lam*W}; its
    # effect on losses >= e is at most
    #   sum_m e^{lam m W} P(S >= e + m W) <= e^{K(l') - l' e - (l'-lam) W} / (1 - e^{-(l'-lam) W})
    # for any l' > lam (Chernoff).  ``width_for(e)`` makes that <= eta_alias.
    lam_up = lam * np.array([1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0])
    k_up = np.zeros(len(lam_up))
    for p, c in zip(plds, counts):
        k_up += c * p.log_mgf(lam_up)

    def log_alias_above(e: float, w: float) -> float:
        gap = (lam_up - lam) * w
        return float(np.min(k_up - lam_up * e - gap - np.log(-np.expm1(-gap))))

    def width_for(e: float) -> float:
        return float(np.min((k_up - lam_up * e - math.log(eta_alias)) / (lam_up - lam))) + 2.0 * h

    span = 8.0 * sd_t + (math.log(max(lam * sd_t, 1.0) + 1.0) + 8.0) / lam
    bottom = min(eps_upper, mean_t) - span
    e_guess = max(bottom, min(eps_upper, mean_t) - 3.0 * sd_t)
    # aliasing from below is damped by e^{-lam W}
    width = max(top_min - bottom, math.log(1.0 / eta_alias) / lam, width_for(e_guess), 64 * h)
    for _attempt in range(6):
        n_fft = next_fast_len(int(math.ceil(width / h)) + 2, real=True)
        if n_fft > MAX_FFT_SIZE:
            raise _GridTooLarge(f"FFT size {n_fft}")
        a_idx = int(math.floor(bottom / h))
        spec = None
        shift = 0
        for p, c, w in zip(plds, counts, tilted):
            center = int(round(float(np.dot(w, np.arange(len(w))))))
            pos = (np.arange(len(w)) - center) % n_fft
            arr = np.bincount(pos, weights=w, minlength=n_fft)
            f = rfft(arr)
            with np.errstate(divide="ignore", invalid="ignore"):
                fc = np.exp(c * np.log(f))
            fc = np.nan_to_num(fc, nan=0.0)
            spec = fc if spec is None else spec * fc
            shift += c * (p.lo + center)
        comp = irfft(spec, n=n_fft)
        # round-off per entry (conservative) and the tilted composition's scale
        err_entry = 4.0 * _U * (math.log2(n_fft) + 2.0) * (1.0 + t_total * float(np.mean(np.abs(spec))) + float(np.max(comp)))
        idx = (a_idx - shift + np.arange(n_fft)) % n_fft
        tilted_win = np.maximum(comp[idx], 0.0)
        loss = (a_idx + np.arange(n_fft)) * h
        # untilt: p_j = tilted_j * exp(K - lam*l_j), capped at 1 (a probability)
        with np.errstate(divide="ignore", over="ignore"):
            log_p = np.log(tilted_win) + (k_lam - lam * loss)
        p = np.exp(np.minimum(log_p, 0.0))
        # delta at grid points: delta_k = p_inf + (e^h - 1) * sum_{i>=k} D_i with
        # D_k = e^{-h} (p_{k+1} + D_{k+1}); every term is non-negative.
        decay = math.exp(-h)
        d_rev = lfilter([0.0, decay], [1.0, -decay], p[::-1])
        g = math.expm1(h) * np.cumsum(d_rev)[::-1]
        # charge the mass lost above the window and the round-off to delta
        delta_grid = p_inf + g
        k = int(np.searchsorted(-delta_grid, -target, side="left"))
        if k == 0:
            # the answer lies below the window: extend it downwards
            bottom -= width
            width *= 2.0
            continue
        if k >= n_fft:
            raise _Uncertified("window too low")
        eps_k = float(loss[k])
        roundoff = err_entry * math.exp(min(k_lam - lam * (eps_k - h), 700.0)) / (-math.expm1(-lam * h))
        slack = eta_hi + roundoff
        if slack > delta_error:
            raise _Uncertified(f"round-off bound {roundoff:.3g} exceeds delta_error {delta_error:.3g}")
        if log_alias_above(float(loss[k - 1]), n_fft * h) > math.log(eta_alias):
            width = max(width * 1.5, width_for(float(loss[k - 1])))
            continue
        d0, d1 = float(delta_grid[k - 1]), float(delta_grid[k])
        frac = (d0 - target) / (d0 - d1) if d0 > d1 else 1.0
        eps = float(loss[k - 1]) + math.log1p(frac * math.expm1(h))
        return eps, n_fft, lam
    raise _Uncertified("could not place the window")


def choose_grid_step(t_total: float, eps_scale: float, lam: float, eps_error: float, rel_error: float) -> float:
    """Grid step h whose second-order bias (1+lam)*T*h^2/8 stays within the error goal."""
    goal = 0.5 * min(eps_error, rel_error * max(eps_scale, 1e-3))
    h = math.sqrt(8.0 * goal / ((1.0 + lam) * max(t_total, 1.0)))
    return min(h, 0.005)


def pld_epsilon(
    blocks: list[tuple[float, float, int]],
    delta: float,
    *,
    eps_error: float = 0.01,
    delta_error: float | None = None,
    eps_hint: float,
    lam_hint: float,
    rel_error: float = 2e-3,
) -> PLDResult:
    """Certified upper bound on epsilon for the composition of ``blocks``.

    ``blocks``: (sigma, q, steps) with distinct (sigma, q); ``eps_hint`` /
    ``lam_hint``: rough epsilon and saddle point (e.g. from RDP: order - 1).
    """
    if delta_error is None:
        delta_error = 1e-3 * delta
    t_total = float(sum(b[2] for b in blocks))
    h = choose_grid_step(t_total, eps_hint, lam_hint, eps_error, rel_error)
    result = _pld_epsilon_at_step(blocks, delta, delta_error, h, lam_hint)
    if result.epsilon is not None:
        # Refine the grid with the better estimates (epsilon, saddle point) if needed.
        h2 = choose_grid_step(t_total, result.epsilon, result.tilt, eps_error, rel_error)
        if h2 < 0.7 * h:
            refined = _pld_epsilon_at_step(blocks, delta, delta_error, h2, result.tilt)
            if refined.epsilon is not None:
                result = PLDResult(min(result.epsilon, refined.epsilon), "", refined.grid_step, refined.fft_size, refined.tilt)
    return result


def _pld_epsilon_at_step(
    blocks: list[tuple[float, float, int]], delta: float, delta_error: float, h: float, lam_hint: float
) -> PLDResult:
    t_total = float(sum(b[2] for b in blocks))
    tail = 1e-3 * delta_error / t_total
    counts = [b[2] for b in blocks]
    two_sided = any(q < 1.0 for _, q, _ in blocks)
    reason = ""
    for _ in range(3):
        try:
            plds = [discretize(s, q, h, "remove", tail) for s, q, _ in blocks]
            eps, n_fft, lam = _epsilon_one_direction(plds, counts, delta, delta_error, max(lam_hint, 1e-3))
            if two_sided:
                # the "add" direction only matters if it needs a larger epsilon
                plds = [discretize(s, q, h, "add", tail) for s, q, _ in blocks]
                eps_add, n_add, _ = _epsilon_one_direction(plds, counts, delta, delta_error, lam, eps_floor=eps)
                eps, n_fft = max(eps, eps_add), max(n_fft, n_add)
            return PLDResult(epsilon=max(eps, 0.0), grid_step=h, fft_size=n_fft, tilt=lam)
        except _GridTooLarge as exc:
            # coarser grid: still a valid upper bound, just less tight
            h *= 4.0
            reason = f"grid too large ({exc})"
        except _Uncertified as exc:
            return PLDResult(epsilon=None, reason=str(exc), grid_step=h)
        except (FloatingPointError, OverflowError, ValueError, ZeroDivisionError) as exc:
            return PLDResult(epsilon=None, reason=f"numerical trouble ({exc})", grid_step=h)
    return PLDResult(epsilon=None, reason=reason, grid_step=h)
