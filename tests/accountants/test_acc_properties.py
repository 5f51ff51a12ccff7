"""Hypothesis property tests: epsilon rises with steps and q, falls with sigma and delta."""

import pytest

from veil.accountants import create_accountant

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ALL = ["rdp", "prv", "gdp"]


def eps(mechanism, history, delta):
    acc = create_accountant(mechanism)
    acc.history = list(history)
    return acc.get_epsilon(delta)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    mechanism=st.sampled_from(ALL),
    sigma=st.floats(0.5, 4.0),
    q=st.floats(1e-3, 0.5),
    steps=st.integers(1, 20_000),
    delta=st.floats(1e-10, 1e-3),
)
def test_monotonicity_property(mechanism, sigma, q, steps, delta):
    e = eps(mechanism, [(sigma, q, steps)], delta)
    tol = 1e-9 + 2e-3 * e  # PRV grids differ between settings: allow its 0.2% bias budget
    assert eps(mechanism, [(sigma, q, 2 * steps)], delta) >= e - tol
    assert eps(mechanism, [(sigma, min(1.0, 1.5 * q), steps)], delta) >= e - tol
    assert eps(mechanism, [(1.2 * sigma, q, steps)], delta) <= e + tol
    assert eps(mechanism, [(sigma, q, steps)], min(0.5, 10 * delta)) <= e + tol
