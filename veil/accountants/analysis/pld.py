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
   h, about (1 + lambda) * T * h^2 / 8, and h is chosen so that it stays below
   min(eps_error, 0.1% of epsilon).
2. **Composition by FFT with exponential tilting.**  The discrete PLDs are tilted
   by e^{lambda*l} (lambda = saddle point at the estimated epsilon), raised to
   their step counts in Fourier space, multiplied and transformed back, then
   untilted.  Tilting makes the region that decides delta the centre of the
   computed distribution, so round-off stays relative (this is what keeps
   delta = 1e-12 with 10^6 steps accurate).
3. **Rigorous window.**  The FFT is cyclic.  The window is chosen with Chernoff
   bounds computed from the *discrete* moment generating function
   K(lambda) = sum_k T_k log E[e^{lambda L_k}]: mass that would wrap around is
   either bounded and charged to delta (mass above the window) or can only
   increase the computed delta (all other aliasing), so the result stays an
   upper bound.  A conservative round-off estimate is charged to delta as well;
   if it does not fit, the tilt is re-centred and the FFT redone in extended
   precision.
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

from .gdp import eps_from_mu as gaussian_epsilon

MAX_FFT_SIZE = 1 << 21  # largest cyclic grid (~2M points) before coarsening / fallback
MAX_SINGLE_GRID = 2_000_000  # largest single-step grid


# ----------------------------------------------------------------------------
# Single-step discretisation
# ----------------------------------------------------------------------------


def _exp_no_subnormal(x: np.ndarray) -> np.ndarray:
    """exp(x) with results below ~1e-304 set to 0 (subnormals make numpy very slow)."""
    return np.exp(np.where(x > -700.0, x, -np.inf))


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

    def __post_init__(self) -> None:
        nz = self.pmf > 0
        self._logp = np.log(self.pmf[nz])
        self._idx = (self.lo + np.flatnonzero(nz)).astype(np.float64)

    def log_mgf(self, lams: np.ndarray) -> np.ndarray:
        """log E[e^{lam*L}; L finite] for every lam in ``lams``."""
        logp, idx = self._logp, self._idx
        out = np.empty(len(lams))
        for i, lam in enumerate(lams):
            v = logp + (lam * self.h) * idx
            m = float(np.max(v))
            out[i] = m + math.log(float(np.sum(_exp_no_subnormal(v - m))))
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


class _RoundOff(_Uncertified):
    """Round-off bound too large; ``eps`` is the (uncertified) answer found."""

    def __init__(self, msg: str, eps: float) -> None:
        super().__init__(msg)
        self.eps = eps


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


@dataclass
class _Solved:
    eps: float
    n_fft: int
    lam: float


class _Composition:
    """Composition of discrete PLDs ``plds[k]`` repeated ``counts[k]`` times."""

    def __init__(self, plds: list[DiscretePLD], counts: list[int], delta: float, delta_error: float) -> None:
        self.plds, self.counts = plds, counts
        self.h = plds[0].h
        self.t_total = float(sum(counts))
        self.delta_error = delta_error
        # mass at +infinity of the composition (exact, pessimistic)
        self.p_inf = -math.expm1(sum(c * math.log1p(-p.p_inf) for p, c in zip(plds, counts)))
        self.target = delta - delta_error
        if self.p_inf >= self.target:
            raise _Uncertified("mass at infinity exceeds delta")
        self.log_budget = math.log(self.target - self.p_inf)
        self._cgf_cache: dict[float, float] = {}

    def cgf(self, lam_values: np.ndarray) -> np.ndarray:
        """K(lam) = sum_k T_k log E[e^{lam L_k}] of the finite part (memoised)."""
        lam_values = np.asarray(lam_values, dtype=np.float64)
        todo = np.array([lam for lam in lam_values if float(lam) not in self._cgf_cache])
        if len(todo):
            out = np.zeros(len(todo))
            for p, c in zip(self.plds, self.counts):
                out += c * p.log_mgf(todo)
            self._cgf_cache.update(zip(todo.tolist(), out.tolist()))
        return np.array([self._cgf_cache[float(lam)] for lam in lam_values])

    def chernoff_eps(self, lams: np.ndarray, kvals: np.ndarray) -> np.ndarray:
        """Upper bounds on epsilon: delta(eps) <= p_inf + c(lam) e^{K(lam) - lam eps}."""
        return (kvals + _log_hockey_const(lams) - self.log_budget) / lams

    def tilt(self, lam_hint: float, eps_guess: float | None = None) -> tuple[float, float, float, np.ndarray, np.ndarray]:
        """Choose the tilt lam: Chernoff-optimal for delta, or (``eps_guess``) for
        bounding delta(eps_guess).  Returns (lam, K(lam), eps_upper, lams, K(lams)).

        lam is capped at 50/h: for (nearly) bounded losses the Chernoff optimum
        runs off to infinity, and a steeper tilt than e^50 per grid step buys nothing.
        """
        lam_max = 50.0 / self.h
        lam_hint = min(lam_hint, lam_max / 64.0)

        def objective(lams: np.ndarray, kvals: np.ndarray) -> np.ndarray:
            if eps_guess is None:
                return self.chernoff_eps(lams, kvals)
            return kvals + _log_hockey_const(lams) - lams * eps_guess

        # lambdas on the lattice 2^(j/3) so that repeated searches share K values
        j0 = round(3.0 * math.log2(lam_hint))
        lams = 2.0 ** ((j0 + 3 * np.arange(-6, 7)) / 3.0)
        kvals = self.cgf(lams)
        for _ in range(3):  # extend the search if the optimum is at an end
            i = int(np.argmin(objective(lams, kvals)))
            if 0 < i < len(lams) - 1 or lams[i] >= lam_max:
                break
            ji = round(3.0 * math.log2(lams[i]))
            ext = 2.0 ** ((ji + 3 * np.arange(1, 7) * (1 if i else -1)) / 3.0)
            ext = ext[ext <= lam_max]
            lams, kvals = np.concatenate([lams, ext]), np.concatenate([kvals, self.cgf(ext)])
            order = np.argsort(lams)
            lams, kvals = lams[order], kvals[order]
        jb = round(3.0 * math.log2(float(lams[int(np.argmin(objective(lams, kvals)))])))
        fine = 2.0 ** ((jb + np.array([-2, -1, 1, 2])) / 3.0)
        fine = fine[fine <= lam_max]
        lams, kvals = np.concatenate([lams, fine]), np.concatenate([kvals, self.cgf(fine)])
        i_t = int(np.argmin(objective(lams, kvals)))
        eps_upper = float(np.min(self.chernoff_eps(lams, kvals)))
        return float(lams[i_t]), float(kvals[i_t]), eps_upper, lams, kvals

    def tilted_blocks(self, lam: float) -> tuple[list[np.ndarray], float, float]:
        """Normalised tilted pmfs and the composition's tilted mean and s.d."""
        tilted, mean_t, var_t = [], 0.0, 0.0
        for p, c in zip(self.plds, self.counts):
            loss = p.losses()
            with np.errstate(divide="ignore"):
                lw = np.log(p.pmf) + lam * loss
            w = _exp_no_subnormal(lw - float(np.max(lw)))
            w /= w.sum()
            mu = float(np.sum(w * loss))  # (no BLAS: its threads stall under load)
            tilted.append(w)
            mean_t += c * mu
            var_t += c * float(np.sum(w * (loss - mu) ** 2))
        return tilted, mean_t, math.sqrt(var_t)

    def estimate(self, lam_hint: float) -> tuple[float, float]:
        """Cheap (saddle point) estimates of epsilon and of the tilt, without FFT."""
        lam, _, eps_upper, _, _ = self.tilt(lam_hint)
        _, _, sd_t = self.tilted_blocks(lam)
        return eps_upper - (math.log1p(2.5 * lam * sd_t) + 1.0) / lam, lam

    def solve(
        self, lam_hint: float, eps_floor: float = -math.inf, eps_guess: float | None = None, extended: bool = False
    ) -> _Solved:
        """Smallest eps with delta(eps) <= delta - delta_error (certified).

        Returns ``eps_floor`` at once if the Chernoff bound already certifies
        delta(eps_floor) <= delta.  ``extended``: FFT in extended precision.
        """
        h, delta_error, target = self.h, self.delta_error, self.target
        lam, k_lam, eps_upper, lams, kvals = self.tilt(lam_hint, eps_guess)
        if eps_upper <= eps_floor:
            return _Solved(eps_floor, 0, lam)
        tilted, mean_t, sd_t = self.tilted_blocks(lam)

        # Window [A, A + W) on the loss axis.
        eta_hi = 0.25 * delta_error  # mass lost above the window (charged to delta)
        eta_alias = 0.05 * delta_error  # aliasing into the region used (only inflates delta)
        lam_up = lam * (1.0 + np.geomspace(1e-3, 31.0, 16))
        k_up = self.cgf(lam_up)
        top_min = float(min(np.min((kvals - math.log(eta_hi)) / lams), np.min((k_up - math.log(eta_hi)) / lam_up)))

        # Mass above the window re-enters at the bottom amplified by e^{lam*W}; its
        # effect on losses >= e is at most
        #   sum_m e^{lam m W} P(S >= e + m W) <= e^{K(l') - l' e - (l'-lam) W} / (1 - e^{-(l'-lam) W})
        # for any l' > lam (Chernoff).  ``width_for(e)`` makes that <= eta_alias.
        def log_alias_above(e: float, w: float) -> float:
            gap = (lam_up - lam) * w
            return float(np.min(k_up - lam_up * e - gap - np.log(-np.expm1(-gap))))

        def width_for(e: float) -> float:
            return float(np.min((k_up - lam_up * e - math.log(eta_alias)) / (lam_up - lam))) + 2.0 * h

        if eps_guess is None:
            # the answer lies somewhat below the Chernoff bound (saddle-point estimate)
            e_guess = eps_upper - (math.log1p(2.5 * lam * sd_t) + 1.0) / lam
        else:
            e_guess = min(eps_guess, eps_upper)
        bottom = min(e_guess, mean_t) - 2.0 * sd_t - 4.0 / lam - 2.0 * h
        # aliasing from below is damped by e^{-lam W}
        width = max(top_min - bottom, math.log(1.0 / eta_alias) / lam, width_for(e_guess), 64 * h)
        dtype = np.longdouble if extended else np.float64
        unit = float(np.finfo(dtype).eps)
        for _attempt in range(6):
            n_fft = next_fast_len(int(math.ceil(width / h)) + 2, real=True)
            if n_fft > MAX_FFT_SIZE:
                raise _GridTooLarge(f"FFT size {n_fft}")
            a_idx = int(math.floor(bottom / h))
            comp, shift, mean_abs = self._compose_fft(tilted, n_fft, dtype)
            # conservative round-off bound per entry of the tilted composition
            err_entry = 4.0 * unit * (math.log2(n_fft) + 2.0) * (1.0 + self.t_total * mean_abs + float(np.max(comp)))
            idx = (a_idx - shift + np.arange(n_fft)) % n_fft
            tilted_win = np.maximum(comp[idx], 0.0)
            loss = (a_idx + np.arange(n_fft)) * h
            # untilt: p_j = tilted_j * exp(K - lam*l_j), capped at 1 (a probability)
            with np.errstate(divide="ignore", over="ignore"):
                log_p = np.log(tilted_win) + (k_lam - lam * loss)
            p = _exp_no_subnormal(np.minimum(log_p, 0.0))
            # delta at grid points: delta_k = p_inf + (e^h - 1) * sum_{i>=k} D_i with
            # D_k = e^{-h} (p_{k+1} + D_{k+1}); every term is non-negative.
            decay = math.exp(-h)
            d_rev = lfilter([0.0, decay], [1.0, -decay], p[::-1])
            delta_grid = self.p_inf + math.expm1(h) * np.cumsum(d_rev)[::-1]
            k = int(np.searchsorted(-delta_grid, -target, side="left"))
            if k == 0:
                # the answer lies below the window: extend it downwards
                bottom -= width
                width *= 2.0
                continue
            if k >= n_fft:
                raise _Uncertified("window too low")
            d0, d1 = float(delta_grid[k - 1]), float(delta_grid[k])
            frac = (d0 - target) / (d0 - d1) if d0 > d1 else 1.0
            eps = float(loss[k - 1]) + math.log1p(frac * math.expm1(h))
            # round-off: delta_{k-1} and delta_k only use entries j >= k
            roundoff = err_entry * math.exp(min(k_lam - lam * float(loss[k]), 700.0)) / (-math.expm1(-lam * h))
            if eta_hi + roundoff > delta_error:
                raise _RoundOff(f"round-off bound {roundoff:.3g} exceeds delta_error {delta_error:.3g}", eps)
            if log_alias_above(float(loss[k - 1]), n_fft * h) > math.log(eta_alias):
                width = max(width * 1.5, width_for(float(loss[k - 1])))
                continue
            return _Solved(eps, n_fft, lam)
        raise _Uncertified("could not place the window")

    def _compose_fft(self, tilted: list[np.ndarray], n_fft: int, dtype: type) -> tuple[np.ndarray, int, float]:
        """Cyclic T-fold composition of the tilted blocks on ``n_fft`` points.

        Frequencies where the modulus underflows are exactly 0 (most of them for
        many steps), so the phase is only computed on the others.
        """
        log_mod = np.zeros(n_fft // 2 + 1, dtype=dtype)
        ffts = []
        shift = 0
        for p, c, w in zip(self.plds, self.counts, tilted):
            center = int(round(float(np.sum(w * np.arange(len(w))))))
            pos = (np.arange(len(w)) - center) % n_fft
            f = rfft(np.bincount(pos, weights=w, minlength=n_fft).astype(dtype))
            with np.errstate(divide="ignore"):
                log_mod += c * np.log(np.abs(f))
            ffts.append(f)
            shift += c * (p.lo + center)
        live = np.flatnonzero(log_mod > -745.0)
        phase = np.zeros(len(live), dtype=dtype)
        for f, c in zip(ffts, self.counts):
            phase += c * np.angle(f[live])
        spec = np.zeros(n_fft // 2 + 1, dtype=np.result_type(dtype, np.complex64))
        spec[live] = np.exp(log_mod[live] + 1j * phase)
        comp = irfft(spec, n=n_fft)
        if not np.all(np.isfinite(comp)):
            raise _Uncertified("non-finite values in the FFT")
        return np.asarray(comp, dtype=np.float64), shift, float(np.mean(np.abs(spec)))


def choose_grid_step(t_total: float, eps_scale: float, lam: float, eps_error: float, rel_error: float) -> float:
    """Grid step h whose second-order bias (1+lam)*T*h^2/8 stays within the error goal.

    The goal is min(eps_error, rel_error*eps) but never below 1e-4*eps; also
    h <= 0.2/lam (the expansion behind the bias estimate needs lam*h small).
    """
    eps_scale = max(eps_scale, 1e-4)
    goal = 0.5 * max(min(eps_error, rel_error * eps_scale), 1e-4 * eps_scale)
    h = math.sqrt(8.0 * goal / ((1.0 + lam) * max(t_total, 1.0)))
    return min(h, 0.2 / max(lam, 1e-9), 0.005)


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
    ``lam_hint``: rough epsilon and tilt (e.g. from RDP: epsilon, order - 1).
    """
    if delta_error is None:
        delta_error = 1e-3 * delta
    if all(q == 1.0 for _, q, _ in blocks):
        # No subsampling: the composition is exactly mu-GDP with mu^2 = sum T/sigma^2.
        mu = math.sqrt(sum(n / (s * s) for s, _, n in blocks))
        eps = gaussian_epsilon(mu, delta)
        return PLDResult(epsilon=eps + 1e-9 * (1.0 + eps))
    t_total = float(sum(b[2] for b in blocks))
    counts = [b[2] for b in blocks]
    tail = 1e-3 * delta_error / t_total
    lam = max(lam_hint, 1e-3)

    def composition(h: float, direction: str) -> _Composition:
        return _Composition([discretize(s, q, h, direction, tail) for s, q, _ in blocks], counts, delta, delta_error)

    def solve(comp: _Composition, lam: float, **kw: float | None) -> _Solved:
        """Solve, re-centring the tilt / using extended precision on round-off trouble."""
        try:
            return comp.solve(lam, **kw)  # type: ignore[arg-type]
        except _RoundOff as exc:
            first = exc
        try:
            return comp.solve(lam, **{**kw, "eps_guess": max(first.eps, kw.get("eps_floor") or -math.inf)})  # type: ignore[arg-type]
        except _RoundOff:
            pass
        return comp.solve(lam, **{**kw, "eps_guess": max(first.eps, kw.get("eps_floor") or -math.inf)}, extended=True)  # type: ignore[arg-type]

    h = choose_grid_step(t_total, eps_hint, lam, eps_error, rel_error)
    try:
        # Grid step from cheap saddle-point estimates (no FFT).
        for _ in range(3):
            try:
                remove = composition(h, "remove")
                eps_est, lam = remove.estimate(lam)
                break
            except _GridTooLarge:
                h *= 4.0
        else:
            return PLDResult(epsilon=None, reason="grid too large", grid_step=h)
        h_new = choose_grid_step(t_total, eps_est, lam, eps_error, rel_error)
        if h_new < 0.8 * h or h_new > 1.5 * h:
            h = h_new
            remove = composition(h, "remove")
        # 1. "remove" direction (coarser grids if the FFT would be too large:
        #    still an upper bound, only less tight).
        for _ in range(4):
            try:
                # tilt at the saddle point of the estimate: the region that decides
                # delta is then the centre of the computed distribution
                sol = solve(remove, lam, eps_guess=eps_est)
                break
            except _GridTooLarge:
                h *= 2.0
                remove = composition(h, "remove")
        else:
            return PLDResult(epsilon=None, reason="grid too large", grid_step=h)
        eps, lam, n_fft = sol.eps, sol.lam, sol.n_fft
        # 2. "add" direction: only matters if it needs a larger epsilon; a coarser
        #    grid (still an upper bound) usually settles that quickly.
        eps_add = math.inf
        for h_add in (2.0 * h, h):
            try:
                sol = solve(composition(h_add, "add"), lam, eps_floor=eps, eps_guess=eps)
            except _GridTooLarge:
                continue
            eps_add, n_fft = sol.eps, max(n_fft, sol.n_fft)
            if eps_add <= eps:
                break
        if not math.isfinite(eps_add):
            return PLDResult(epsilon=None, reason="grid too large (add direction)", grid_step=h)
        return PLDResult(epsilon=max(eps, eps_add, 0.0), grid_step=h, fft_size=n_fft, tilt=lam)
    except _Uncertified as exc:
        return PLDResult(epsilon=None, reason=str(exc), grid_step=h)
    except _GridTooLarge as exc:
        return PLDResult(epsilon=None, reason=f"grid too large ({exc})", grid_step=h)
    except (FloatingPointError, OverflowError, ValueError, ZeroDivisionError) as exc:
        return PLDResult(epsilon=None, reason=f"numerical trouble ({exc})", grid_step=h)
