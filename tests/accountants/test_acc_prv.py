"""PRV accountant specifics: guarantees, fallback, options, speed."""

import math
import warnings

import pytest

from veil.accountants import PRVAccountant, RDPAccountant
from veil.accountants.analysis import pld as pld_analysis


def _prv(history, delta, **kw):
    acc = PRVAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta, **kw)


def _rdp(history, delta):
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta)


def test_falls_back_to_rdp_with_warning(monkeypatch):
    monkeypatch.setattr(pld_analysis, "MAX_FFT_SIZE", 64)
    history = [(1.0, 0.01, 5000)]
    with pytest.warns(RuntimeWarning, match="RDP"):
        got = _prv(history, 1e-5)
    assert got == _rdp(history, 1e-5)


def test_never_above_rdp_and_positive():
    for history in ([(0.7, 0.05, 30)], [(2.0, 0.001, 10**5)], [(1.0, 1e-4, 10**4)]):
        for delta in (1e-3, 1e-12):
            e = _prv(history, delta)
            assert 0 <= e <= _rdp(history, delta) and not math.isnan(e)


def test_tiny_q_tiny_delta_much_tighter_than_rdp():
    # Rare participation: RDP's conversion is loose, the PLD is not.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = _prv([(1.0, 1e-4, 10**4)], 1e-12)
    assert e < 0.5 * _rdp([(1.0, 1e-4, 10**4)], 1e-12)


def test_eps_error_option_tightens():
    history = [(1.2, 0.02, 4000)]
    coarse = _prv(history, 1e-6, eps_error=0.1)
    fine = _prv(history, 1e-6, eps_error=1e-3)
    assert fine <= coarse + 1e-9
    assert coarse - fine < 0.1


def test_bad_options():
    acc = PRVAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="eps_error"):
        acc.get_epsilon(1e-5, eps_error=0.0)
    with pytest.raises(ValueError, match="delta_error"):
        acc.get_epsilon(1e-5, delta_error=1e-5)


def test_million_steps_is_tight():
    """10^6 steps are certified by the tight method (no RDP fallback); speed is in benchmarks/accounting."""
    acc = PRVAccountant()
    acc.history = [(0.81, 0.001, 10**6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps = acc.get_epsilon(1e-6)
    rdp = RDPAccountant()
    rdp.history = list(acc.history)
    assert 0 < eps < rdp.get_epsilon(1e-6)


def test_large_history_of_distinct_blocks():
    history = [(1.0 + 0.01 * i, 0.01, 100) for i in range(20)]
    e = _prv(history, 1e-5)
    assert 0 < e <= _rdp(history, 1e-5)
