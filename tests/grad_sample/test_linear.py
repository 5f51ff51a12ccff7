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
