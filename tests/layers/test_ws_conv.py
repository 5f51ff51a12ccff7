"""WSConv1d/2d/3d: weight standardisation in the forward, exact per-sample clipping of the raw weight."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from tests.models import CalledTwice
from tests.reference import assert_matches_reference
from veil.layers import WSConv1d, WSConv2d, WSConv3d

WS = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def tanh_loss(y, i):
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(i))
    return (torch.tanh(y) * w).sum()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_forward_standardises_each_output_channel(n):
    torch.manual_seed(0)
    m = WS[n](4, 6, 3, padding=1, groups=2, eps=1e-4)
    w = m.weight.detach().reshape(6, -1)
    w_hat = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + 1e-4)
    x = torch.randn(2, 4, *[5] * n)
    want = CONV[n](x, w_hat.reshape(m.weight.shape), m.bias, padding=1, groups=2)
    torch.testing.assert_close(m(x), want)
    assert torch.allclose(m.standardized_weight().reshape(6, -1).mean(1), torch.zeros(6), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), groups=st.integers(1, 2), k=st.integers(2, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 1), bias=st.booleans(), B=st.integers(0, 3), calls=st.integers(1, 2))
def test_per_sample_gradients_of_the_raw_weight_are_exact(n, groups, k, stride, padding, bias, B, calls):
    """Norms and clipped sums of the gradients with respect to the parameter (not the standardised
    weight) equal one-sample-at-a-time autograd in every mode, also for a layer called twice. (Fan-in
    at least 4: with a fan-in of 2 the standardisation leaves a gradient of order eps, all round-off.)"""
    torch.manual_seed(0)
    conv = WS[n](2 * groups, 2 * groups, k, stride=stride, padding=padding, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)  # a mean and scale that the standardisation must remove

    x = torch.randn(B, 2 * groups, *[k + 3] * n)
    assert_matches_reference(CalledTwice(conv, calls, lambda x: x * 0.5 + 1.0), (x,), tanh_loss, B)


def test_in_a_gn_network_with_chunked_norms(monkeypatch):
    """Norms formed a few samples at a time (a tiny chunk budget) give the same result."""
    from veil.grad_sample.rules import conv as conv_rule

    monkeypatch.setattr(conv_rule, "CHUNK_ELEMENTS", 50)
    torch.manual_seed(1)
    net = nn.Sequential(WSConv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), WSConv2d(4, 4, 3, stride=2),
                        nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    x = torch.randn(5, 1, 7, 7)
    assert_matches_reference(net, (x,), tanh_loss, 5, modes=("auto", "ghost", "instantiate"))
