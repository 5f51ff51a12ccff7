import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from tests.reference import assert_matches_reference



@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(0, 5),
    T=st.one_of(st.just(None), st.integers(1, 6)),
    d=st.integers(1, 7),
    p=st.integers(1, 7),
    bias=st.booleans(),
    batch_first=st.booleans(),
    calls=st.integers(1, 3),
)
def test_linear_matches_brute_force(B, T, d, p, bias, batch_first, calls):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(d, p, bias=bias)

        def forward(self, x):
            y = self.lin(x)
            for _ in range(calls - 1):
                y = y + self.lin(x * 0.5)
            return y

    shape = (B, d) if T is None else ((B, T, d) if batch_first else (T, B, d))
    x = torch.randn(*shape)
    w = torch.randn(p)
    assert_matches_reference(
        Net(), (x,), lambda y, i: (torch.tanh(y) * w).sum(), B, batch_first=batch_first or T is None
    )


@pytest.mark.parametrize("use_onednn", [True, False])
@pytest.mark.parametrize("shape", [(5, 1, 7, 3), (4, 6, 3, 9), (3, 4, 16, 16)])
def test_float32_clipped_sum_on_both_gemm_paths(use_onednn, shape, monkeypatch):
    """The ghost clipped sum (c⊙g)ᵀa in float32, on oneDNN and on torch's addmm, equals the float64
    sum of per-sample gradients, also for a strided (non-dense) input."""
    from veil.grad_sample import gemm
    from veil.grad_sample.rules.linear import LinearGhostGrads

    monkeypatch.setattr(gemm, "USE_ONEDNN", use_onednn)
    B, T, d, p = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(B, T, 2 * d, generator=gen)[..., ::2]  # strided view
    g = torch.randn(B, T, p, generator=gen)
    c = torch.rand(B, generator=gen)
    expected = torch.einsum("b,btp,btd->pd", c.double(), g.double(), a.double())
    out = torch.ones(p, d)
    LinearGhostGrads(a, g, ["weight"]).add_clipped_sum_("weight", c, out)
    torch.testing.assert_close(out.double(), expected + 1, rtol=1e-5, atol=1e-5)
    dense = LinearGhostGrads(a.contiguous(), g, ["weight"]).clipped_sum({"weight": c})["weight"]
    torch.testing.assert_close(dense.double(), expected, rtol=1e-5, atol=1e-5)
