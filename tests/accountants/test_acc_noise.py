"""get_noise_multiplier: calibration, speed, inputs."""


import pytest

from veil.accountants import create_accountant, get_noise_multiplier


def _eps(mechanism, sigma, q, steps, delta):
    acc = create_accountant(mechanism)
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("mechanism", ["prv", "rdp", "gdp"])
@pytest.mark.parametrize("target,q,steps,delta", [(3.0, 0.01, 1000, 1e-5), (8.0, 0.004, 10**6, 1e-6), (1.0, 0.1, 50, 1e-8)])
def test_reaches_target(mechanism, target, q, steps, delta):
    sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant=mechanism)
    e = _eps(mechanism, sigma, q, steps, delta)
    assert target - 0.01 <= e <= target
    assert _eps(mechanism, 0.98 * sigma, q, steps, delta) > target


def test_epochs_are_rounded_to_steps():
    a = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.03, epochs=5)
    b = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.03, steps=round(5 / 0.03))
    assert a == b


def test_tolerance_and_kwargs():
    sigma = get_noise_multiplier(2.0, 1e-5, 0.01, steps=2000, accountant="rdp", epsilon_tolerance=0.001)
    assert 1.999 <= _eps("rdp", sigma, 0.01, 2000, 1e-5) <= 2.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(target_delta=0.0), "target_delta"),
        (dict(target_delta=1.0), "target_delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(steps=None), "epochs"),
        (dict(epochs=3), "epochs"),
        (dict(accountant="nope"), "nope"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        get_noise_multiplier(**args)


def test_unreachable_small_target():
    with pytest.raises(ValueError, match="unreachable"):
        get_noise_multiplier(target_epsilon=1e-7, target_delta=1e-5, sample_rate=0.5, steps=10**5, accountant="rdp")


def test_unreachable_large_target():
    with pytest.raises(ValueError, match="unreachable"):
        get_noise_multiplier(target_epsilon=1e6, target_delta=1e-5, sample_rate=0.01, steps=10, accountant="rdp")
