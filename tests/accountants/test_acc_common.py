"""Behaviour shared by all accountants: API, history, state, inputs, monotonicity."""

import math
import warnings
from types import SimpleNamespace

import pytest

from veil.accountants import (
    GaussianAccountant,
    IAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
    get_noise_multiplier,
)
from veil.accountants import utils as acc_utils

ALL = ["rdp", "prv", "gdp"]


def eps(mechanism, history, delta=1e-5):
    acc = create_accountant(mechanism)
    acc.history = list(history)
    return acc.get_epsilon(delta)


def test_exports():
    assert acc_utils.get_noise_multiplier is get_noise_multiplier
    for cls, name in [(RDPAccountant, "rdp"), (PRVAccountant, "prv"), (GaussianAccountant, "gdp")]:
        assert issubclass(cls, IAccountant)
        assert cls.mechanism() == name
        assert isinstance(create_accountant(name), cls)
        assert isinstance(create_accountant(mechanism=name), cls)


def test_iaccountant_is_abstract():
    with pytest.raises(TypeError):
        IAccountant()


def test_create_accountant_unknown_lists_choices():
    with pytest.raises(ValueError, match="gdp.*prv.*rdp"):
        create_accountant("moments")


@pytest.mark.parametrize("mechanism", ALL)
def test_history_merges_consecutive_steps(mechanism):
    acc = create_accountant(mechanism)
    assert len(acc) == 0 and acc.history == []
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=2.0, sample_rate=0.01)
    acc.step(noise_multiplier=2.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.history == [(1.0, 0.01, 3), (2.0, 0.01, 2), (1.0, 0.01, 1)]
    assert len(acc) == 6


@pytest.mark.parametrize("mechanism", ALL)
def test_zero_steps_is_zero_epsilon(mechanism):
    acc = create_accountant(mechanism)
    assert acc.get_epsilon(1e-5) == 0.0
    acc.history = [(1.0, 0.1, 0)]
    assert acc.get_epsilon(1e-5) == 0.0


@pytest.mark.parametrize("mechanism", ALL)
def test_state_dict_round_trip(mechanism):
    acc = create_accountant(mechanism)
    for sigma in (1.0, 1.0, 1.3, 1.3, 1.3, 0.9):
        acc.step(noise_multiplier=sigma, sample_rate=0.02)
    acc.history[-1] = (0.9, 0.02, 500)
    state = acc.state_dict()
    assert state["mechanism"] == mechanism
    restored = create_accountant(mechanism)
    restored.load_state_dict(state)
    assert restored.history == acc.history
    assert restored.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
    # the saved state is a copy
    acc.step(noise_multiplier=5.0, sample_rate=0.5)
    assert state["history"] != acc.history
    dest = {"other": 1}
    assert acc.state_dict(dest) is dest and dest["mechanism"] == mechanism


def test_load_state_dict_validates():
    acc = RDPAccountant()
    with pytest.raises(ValueError):
        acc.load_state_dict({})
    with pytest.raises(ValueError, match="history"):
        acc.load_state_dict({"mechanism": "rdp"})
    with pytest.raises(ValueError, match="mechanism"):
        acc.load_state_dict({"history": []})
    with pytest.raises(ValueError, match="prv"):
        acc.load_state_dict(PRVAccountant().state_dict())
    with pytest.raises(ValueError, match="sample_rate"):
        acc.load_state_dict({"history": [(1.0, 2.0, 3)], "mechanism": "rdp"})


@pytest.mark.parametrize("mechanism", ALL)
def test_optimizer_hook(mechanism):
    acc = create_accountant(mechanism)
    hook = acc.get_optimizer_hook_fn(sample_rate=0.01)
    hook(SimpleNamespace(noise_multiplier=1.2, accumulated_iterations=4))
    hook(SimpleNamespace(noise_multiplier=1.2))  # missing attribute counts as 1
    hook(SimpleNamespace(noise_multiplier=1.2))
    assert acc.history == [(1.2, 0.04, 1), (1.2, 0.01, 2)]


@pytest.mark.parametrize("mechanism", ALL)
@pytest.mark.parametrize("bad_q", [0.0, -0.1, 1.5, float("nan")])
def test_bad_sample_rate(mechanism, bad_q):
    acc = create_accountant(mechanism)
    with pytest.raises(ValueError, match=r"sample_rate.*\(0, 1\]"):
        acc.step(noise_multiplier=1.0, sample_rate=bad_q)
    assert acc.history == []


@pytest.mark.parametrize("mechanism", ALL)
@pytest.mark.parametrize("bad_sigma", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_noise_multiplier(mechanism, bad_sigma):
    acc = create_accountant(mechanism)
    with pytest.raises(ValueError, match="noise_multiplier.*> 0"):
        acc.step(noise_multiplier=bad_sigma, sample_rate=0.1)


@pytest.mark.parametrize("mechanism", ALL)
@pytest.mark.parametrize("bad_delta", [0.0, 1.0, -1e-5, 2.0])
def test_bad_delta(mechanism, bad_delta):
    acc = create_accountant(mechanism)
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"delta.*\(0, 1\)"):
        acc.get_epsilon(bad_delta)


def test_bad_history_entry_rejected_at_get_epsilon():
    acc = PRVAccountant()
    acc.history = [(0.0, 0.1, 10)]
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.get_epsilon(1e-5)


@pytest.mark.parametrize("mechanism", ALL)
def test_monotonicity(mechanism):
    base = eps(mechanism, [(1.0, 0.01, 1000)])
    assert eps(mechanism, [(1.0, 0.01, 2000)]) > base  # more steps
    assert eps(mechanism, [(1.0, 0.02, 1000)]) > base  # larger sampling rate
    assert eps(mechanism, [(1.3, 0.01, 1000)]) < base  # more noise
    assert eps(mechanism, [(1.0, 0.01, 1000)], delta=1e-3) < base  # larger delta
    assert base > 0 and math.isfinite(base)


@pytest.mark.parametrize("mechanism", ALL)
def test_mixed_history_is_order_free_and_between_pure(mechanism):
    a = eps(mechanism, [(1.0, 0.01, 500), (2.0, 0.02, 300)])
    b = eps(mechanism, [(2.0, 0.02, 300), (1.0, 0.01, 500)])
    assert a == pytest.approx(b, rel=1e-9)
    assert a > eps(mechanism, [(1.0, 0.01, 500)])
    assert a > eps(mechanism, [(2.0, 0.02, 300)])


@pytest.mark.parametrize(
    "sigma,q,steps,delta",
    [
        (0.3, 0.01, 100, 1e-5),  # small sigma, epsilon > 10
        (1.0, 1.0, 10, 1e-5),  # no subsampling
        (1.0, 0.001, 10**6, 1e-6),  # a million steps
        (1.5, 0.01, 1000, 1e-12),  # tiny delta
    ],
)
def test_edges_finite_and_ordered(sigma, q, steps, delta):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the PRV accountant must not need its fallback here
        e_prv = eps("prv", [(sigma, q, steps)], delta)
    e_rdp = eps("rdp", [(sigma, q, steps)], delta)
    e_gdp = eps("gdp", [(sigma, q, steps)], delta)
    for e in (e_prv, e_rdp, e_gdp):
        assert math.isfinite(e) and e > 0
    assert e_prv <= e_rdp


def test_large_epsilon_edge():
    assert eps("prv", [(0.3, 0.05, 1000)]) > 10
    assert eps("rdp", [(0.3, 0.05, 1000)]) > 10

