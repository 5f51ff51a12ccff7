import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from tests.models import CalledTwice
from tests.reference import ChunkProbe, assert_matches_reference, engine_chunk
from veil.grad_sample import GradSampleModule
from veil.grad_sample.rules.base import Call, InstantiatedGrads, rule_for
from veil.grad_sample.rules.conv import ConvGhostGrads


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def tanh_loss(y, i):
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(i))
    return (torch.tanh(y) * w).sum()


@st.composite
def conv_configs(draw):
    n = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    dilation = [draw(st.integers(1, 2)) for _ in range(n)]
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = [1] * n if padding_kind == "same" else [draw(st.integers(1, 2)) for _ in range(n)]
    padding = {
        "int": draw(st.integers(0, 2)),
        "tuple": tuple(draw(st.integers(0, 2)) for _ in range(n)),
        "same": "same",
        "valid": "valid",
    }[padding_kind]
    pads = [padding] * n if isinstance(padding, int) else (padding if isinstance(padding, tuple) else [0] * n)
    if padding == "same":
        pads = [d * (k - 1) for d, k in zip(dilation, kernel)]
    # big enough for the kernel span and for reflect padding (pad < size); small for speed
    spatial = [
        max(d * (k - 1) + 1, p + 1) + draw(st.integers(0, 1 if n == 3 else 4))
        for d, k, p in zip(dilation, kernel, pads)
    ]
    module = CONV[n](
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
    )
    return module, c_in, spatial


@settings(max_examples=40, deadline=None)
@given(cfg=conv_configs(), B=st.integers(0, 3), calls=st.integers(1, 2), frozen_bias=st.booleans())
def test_conv_matches_brute_force(cfg, B, calls, frozen_bias):
    torch.manual_seed(0)
    conv, c_in, spatial = cfg
    if frozen_bias and conv.bias is not None:
        conv.bias.requires_grad_(False)

    # a second call on a larger input: a different number of output positions
    net = CalledTwice(conv, calls, lambda x: torch.cat([x, x * 0.5], -1))
    x = torch.randn(B, c_in, *spatial)
    assert_matches_reference(net, (x,), tanh_loss, B)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "n, kwargs",
    [
        (1, dict(kernel_size=4, padding="same", dilation=1)),  # even kernel: odd extra pad goes after
        (2, dict(kernel_size=(2, 3), padding="same", dilation=(1, 2))),
        (3, dict(kernel_size=(2, 1, 2), padding="same")),
        (2, dict(kernel_size=3, stride=2, padding=(2, 1), dilation=2, groups=2)),
        (3, dict(kernel_size=(1, 2, 3), stride=(2, 1, 2), padding=1, groups=2)),
    ],
)
def test_conv_padding_modes(n, kwargs, padding_mode):
    torch.manual_seed(0)
    conv = CONV[n](2, 4, padding_mode=padding_mode, **kwargs)
    x = torch.randn(3, 2, *[7, 6, 5][:n])
    assert_matches_reference(conv, (x,), tanh_loss, 3)


def test_frozen_bias_has_no_entry():
    conv = nn.Conv2d(2, 3, 3)
    conv.bias.requires_grad_(False)
    for mode in ("auto", "ghost", "instantiate"):
        probe = engine_chunk(conv, (torch.randn(2, 2, 5, 5),), lambda y: y.square().sum(), mode)
        assert set(probe.norms_sq) == {"weight"}


@pytest.mark.parametrize(
    "module, x, ghost",
    [
        (nn.Conv2d(64, 64, 3), torch.randn(2, 64, 4, 4), True),  # L=4, k=576, p=64: ghost is cheaper
        (nn.Conv2d(3, 8, 3), torch.randn(2, 3, 16, 16), False),  # L=196, k=27, p=8
        (nn.Conv1d(8, 16, 3, groups=8), torch.randn(2, 8, 6), False),  # per group k=3, p=2
    ],
)
def test_auto_picks_cheaper_path(module, x, ghost):
    module, x = module.double(), x.double()  # built at collection time, outside the float64 fixture
    rule = rule_for(module)
    y = module(x)
    call = Call(ctx=rule.capture(module, (x,), {}, True), grad=torch.randn_like(y))
    lg = rule.layer_grads(module, [call], ["weight", "bias"], "auto")
    assert isinstance(lg, ConvGhostGrads if ghost else InstantiatedGrads)
    ref = rule.layer_grads(module, [call], ["weight", "bias"], "instantiate" if ghost else "ghost")
    for n in ("weight", "bias"):
        torch.testing.assert_close(lg.norms_sq[n], ref.norms_sq[n], rtol=1e-10, atol=0)


def test_unbatched_input_is_refused():
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match="batch"):
        rule_for(conv).capture(conv, (torch.randn(2, 5, 5),), {}, True)


@pytest.mark.parametrize("mode", ["ghost", "instantiate"])
def test_autocast_bf16_accumulates_in_fp32(mode):
    """Forward under autocast: the captured input is fp32 and the output gradient bf16."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 3, 6, 6)
    exact = engine_chunk(conv, (x,), lambda y: y.square().sum(), mode)
    gsm = GradSampleModule(copy.deepcopy(conv).float(), loss_reduction="sum", mode=mode)
    low = gsm.consumer = ChunkProbe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gsm(x.float())
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for n in ("weight", "bias"):
        assert low.norms_sq[n].dtype == low.clipped[n].dtype == torch.float32
        torch.testing.assert_close(low.norms_sq[n].double(), exact.norms_sq[n], rtol=5e-2, atol=0)
        torch.testing.assert_close(low.clipped[n].double(), exact.clipped[n], rtol=5e-2, atol=5e-2)


@settings(max_examples=40, deadline=None)
@given(cfg=conv_configs(), B=st.integers(1, 3), form=st.sampled_from(["forward", "backward"]))
def test_weight_per_sample_forms_match_autograd(cfg, B, form):
    """Both per-sample weight-gradient forms equal one-sample-at-a-time autograd."""
    from veil.grad_sample.rules.conv import pad_input, weight_per_sample

    conv, c_in, spatial = cfg
    conv = conv.double()
    x = torch.randn(B, c_in, *spatial, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    expected = []
    for i in range(B):
        (w,) = torch.autograd.grad((conv(x[i : i + 1]) * g[i : i + 1]).sum(), [conv.weight])
        expected.append(w)
    got = weight_per_sample(conv, pad_input(conv, x), g, form=form)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 30])
@pytest.mark.parametrize("norms", ["gram", "per_sample"])
@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"), (5, 3, 9, 9)),
        (nn.Conv1d(4, 6, 3, groups=2, dilation=2), (4, 4, 11)),
    ],
)
def test_chunked_norms_and_conv_clipped_sum(module, shape, norms, chunk, monkeypatch):
    """Norms computed a few samples at a time (Gram matrices or per-sample gradients), and the clipped
    sum as one weight-gradient convolution, equal the instantiated per-sample gradients', over two calls."""
    import veil.grad_sample.rules.conv as conv_rules

    monkeypatch.setattr(conv_rules, "CHUNK_ELEMENTS", chunk)
    module = module.double()
    rule = rule_for(module)
    calls = []
    for scale in (1.0, 0.5):
        x = torch.randn(*shape, dtype=torch.float64) * scale
        y = module(x)
        calls.append(Call(ctx=rule.capture(module, (x,), {}, True), grad=torch.randn_like(y)))
    xs, gs = conv_rules.prepare(module, calls)
    got = ConvGhostGrads(module, xs, gs, ["weight", "bias"], norms=norms)
    ref = InstantiatedGrads(conv_rules.conv_per_sample(module, xs, gs, ["weight", "bias"]))
    c = torch.rand(shape[0], dtype=torch.float64)
    for n in ("weight", "bias"):
        torch.testing.assert_close(got.norms_sq[n], ref.norms_sq[n], rtol=1e-10, atol=0)
        torch.testing.assert_close(got.clipped_sum({n: c})[n], ref.clipped_sum({n: c})[n], rtol=1e-10, atol=1e-12)


def test_auto_keeps_large_per_sample_gradients_transient():
    """A layer whose B per-sample gradients would not fit in one chunk gets chunked per-sample norms
    and a convolution clipped sum instead of B copies of its weight."""

    module = nn.Conv2d(16, 32, 4, stride=2).double()
    x = torch.randn(70, 16, 13, 13, dtype=torch.float64)  # 70 x 8192 weight elements > one chunk
    rule = rule_for(module)
    call = Call(ctx=rule.capture(module, (x,), {}, True), grad=torch.randn_like(module(x)))
    lg = rule.layer_grads(module, [call], ["weight", "bias"], "auto")
    assert isinstance(lg, ConvGhostGrads)
    ref = rule.layer_grads(module, [call], ["weight", "bias"], "instantiate")
    torch.testing.assert_close(lg.norms_sq["weight"], ref.norms_sq["weight"], rtol=1e-10, atol=0)
