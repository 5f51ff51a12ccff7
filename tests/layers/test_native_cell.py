"""The LSTM cell's compiled pointwise kernels (veil/csrc/lstm_cell.c) against the torch-ops path."""
import shutil

import pytest
import torch

from veil.layers import _recurrence as R
from veil.utils import native

needs_cell = pytest.mark.skipif(R.lstm_cell() is None, reason="no C compiler: compiled LSTM cell unavailable")


@pytest.fixture(autouse=True)
def float32_and_restore():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)
    native.set_enabled("lstm_cell", True)


def test_built_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc"):
        assert R.lstm_cell() is not None


def test_veil_native_0_disables_it(monkeypatch):
    monkeypatch.setenv("VEIL_NATIVE", "0")
    assert native.build("lstm_cell") is None


def _run(use, xg, b_hh, W, h0, c0, reverse, masks, d_out, d_hT, d_cT):
    native.set_enabled("lstm_cell", use)
    s = R.scan("LSTM", xg, b_hh, W, None, h0, c0, reverse, masks)
    assert ("native" in s.extra) == use
    dG, _, dh0, dc0 = R._lstm_bptt(s, d_out, d_hT, d_cT, True, True)
    return dict(out=s.out, hT=s.hT, cT=s.cT, z=s.z, acts=s.extra["acts"], C=s.extra["C"], dG=dG, dh0=dh0, dc0=dc0)


@needs_cell
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_native_equals_torch_path(reverse, masked, bias, scale):
    """Every buffer the engine and the BPTT read agrees with the torch path to float32 rounding, including
    saturated gates (scale 20) and samples that end early (masks, as PackedSequence gives)."""
    g = torch.Generator().manual_seed(1)
    B, T, H = 5, 7, 6
    xg = torch.randn(B, T, 4 * H, generator=g) * scale
    W = torch.randn(4 * H, H, generator=g) * 0.3
    b_hh = torch.randn(4 * H, generator=g) if bias else None
    h0, c0 = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    masks = None
    if masked:
        lengths = torch.tensor([7, 1, 4, 6, 2])
        masks = (torch.arange(T)[None, :] < lengths[:, None]).unsqueeze(-1)  # as DPLSTM builds them
    d_out = torch.randn(B, T, H, generator=g)
    d_hT, d_cT = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    args = (xg, b_hh, W, h0, c0, reverse, masks, d_out, d_hT, d_cT)
    a, b = _run(True, *args), _run(False, *args)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=2e-6 * max(1.0, b[k].abs().max().item())), (k, (a[k] - b[k]).abs().max())


@needs_cell
def test_nan_propagates():
    """A NaN input stays NaN in its own sample (the exp's range clamp keeps NaN) and touches no other."""
    g = torch.Generator().manual_seed(0)
    B, T, H = 3, 4, 5
    xg = torch.randn(B, T, 4 * H, generator=g)
    xg[1, 2, 3] = float("nan")
    s = R.scan("LSTM", xg, None, torch.randn(4 * H, H, generator=g), None, torch.zeros(B, H), torch.zeros(B, H), False, None)
    assert "native" in s.extra
    assert torch.isnan(s.out[1, 2:]).any() and torch.isnan(s.out[1, 3]).all()
    assert torch.isfinite(s.out[[0, 2]]).all() and torch.isfinite(s.out[1, :2]).all()


@needs_cell
def test_lstm_layer_uses_native_cell_in_float32():
    from veil.layers import DPLSTM

    m = DPLSTM(3, 4, batch_first=True)
    seen = []
    orig = R._lstm_scan_native

    def spy(*a, **k):
        seen.append(1)
        return orig(*a, **k)

    R._lstm_scan_native = spy
    try:
        m(torch.randn(2, 5, 3))
        m.double()(torch.randn(2, 5, 3, dtype=torch.float64))  # float64: torch path
    finally:
        R._lstm_scan_native = orig
    assert seen == [1]
