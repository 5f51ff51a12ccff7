"""Golden values (from Opacus's public tests) and closed-form checks."""

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from veil.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from veil.accountants.analysis import gdp as gdp_analysis
from veil.accountants.analysis import rdp as rdp_analysis

SIGMA, Q, STEPS, DELTA = 1.5, 0.04, 2250, 1e-5


def _acc(cls, history):
    acc = cls()
    acc.history = list(history)
    return acc


def test_rdp_golden():
    acc = _acc(RDPAccountant, [(SIGMA, Q, STEPS)])
    assert acc.get_epsilon(DELTA) == pytest.approx(7.3291, abs=2e-4)
    eps, alpha = acc.get_privacy_spent(delta=DELTA)
    assert eps == pytest.approx(7.3291, abs=2e-4) and alpha > 1
    # the Opacus order grid gives the same optimum here
    opacus_alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    assert acc.get_epsilon(DELTA, alphas=opacus_alphas) == pytest.approx(7.3291, abs=2e-4)


def test_prv_golden():
    eps = _acc(PRVAccountant, [(SIGMA, Q, STEPS)]).get_epsilon(DELTA)
    assert eps == pytest.approx(6.78, abs=0.015)


def test_gdp_golden():
    eps = _acc(GaussianAccountant, [(SIGMA, Q, STEPS)]).get_epsilon(DELTA)
    assert 6.59 <= eps <= 6.605


def test_gdp_matches_clt_formula():
    acc = _acc(GaussianAccountant, [(SIGMA, Q, STEPS)])
    mu = Q * math.sqrt(STEPS * (math.exp(SIGMA**-2) - 1))
    assert acc.get_mu() == pytest.approx(mu, rel=1e-12)
    eps = acc.get_epsilon(DELTA)
    delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert delta == pytest.approx(DELTA, rel=1e-6)


def test_gdp_mixed_history_adds_mu_squared():
    acc = _acc(GaussianAccountant, [(1.0, 0.01, 400), (2.0, 0.05, 100)])
    mu1 = gdp_analysis.mu_poisson(noise_multiplier=1.0, sample_rate=0.01, steps=400)
    mu2 = gdp_analysis.mu_poisson(noise_multiplier=2.0, sample_rate=0.05, steps=100)
    assert acc.get_mu() == pytest.approx(math.hypot(mu1, mu2), rel=1e-12)
    assert acc.get_epsilon(1e-5) == pytest.approx(gdp_analysis.eps_from_mu(math.hypot(mu1, mu2), 1e-5), rel=1e-12)


def test_gdp_uniform_sampling_option():
    acc = _acc(GaussianAccountant, [(1.0, 0.01, 1000)])
    assert acc.get_epsilon(1e-5, poisson=False) > 0


@pytest.mark.parametrize("sigma,steps,delta", [(0.3, 1, 1e-5), (1.0, 1, 1e-6), (2.0, 50, 1e-9)])
def test_prv_exact_without_subsampling(sigma, steps, delta):
    """q = 1: the composition is the Gaussian mechanism with sigma/sqrt(T) (exact formula)."""
    s = sigma / math.sqrt(steps)

    def f(e):
        return norm.cdf(-e * s + 1 / (2 * s)) - math.exp(e) * norm.cdf(-e * s - 1 / (2 * s)) - delta

    exact = brentq(f, 0, 500, xtol=1e-13)
    got = _acc(PRVAccountant, [(sigma, 1.0, steps)]).get_epsilon(delta)
    assert exact <= got <= exact * (1 + 1e-6)


@pytest.mark.parametrize("q,sigma,alpha", [(1e-5, 0.3, 1.1), (0.01, 0.6, 1.1), (0.04, 1.0, 1.1), (0.04, 0.3, 1.5), (0.3, 100.0, 2.5)])
def test_rdp_fractional_order_is_exact(q, sigma, alpha):
    """Fractional-order RDP against an independent high-precision integral."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30

    def integrand(z):
        return mp.npdf(z, 0, sigma) * (1 - q + q * mp.e ** ((2 * z - 1) / (2 * sigma**2))) ** alpha

    ref = float(mp.log(mp.quad(integrand, [-mp.inf, -5 * sigma, 0, 0.5, 1, alpha, alpha + 5 * sigma, mp.inf])) / (alpha - 1))
    got = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    assert got == pytest.approx(ref, rel=1e-8)


def test_rdp_integer_order_closed_form():
    # order 2: A_2 = 1 + q^2 (e^{1/sigma^2} - 1)
    q, sigma = 0.05, 0.8
    got = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=3, orders=[2])[0]
    assert got == pytest.approx(3 * math.log1p(q * q * math.expm1(sigma**-2)), rel=1e-12)
