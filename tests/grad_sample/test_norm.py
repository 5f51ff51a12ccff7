import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from tests.reference import assert_matches_reference, engine_chunk
from veil.grad_sample.rules.base import Call, InstantiatedGrads, rule_for



def tanh_loss(y, i):
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(i))
    return (torch.tanh(y) * w).sum()


class Twice(nn.Module):
    """Calls the layer once or twice (on a scaled, shifted input) and adds the outputs."""

    def __init__(self, layer: nn.Module, calls: int):
        super().__init__()
        self.layer, self.calls = layer, calls

    def forward(self, x):
        y = self.layer(x)
        return y if self.calls == 1 else y * self.layer(2 * x + 1)


def randomise(module: nn.Module) -> nn.Module:
    """Affine parameters away from their (1, 0) initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(0, 4),
    lead=st.lists(st.integers(1, 3), max_size=2),
    normalized=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    rms=st.booleans(),
    bias=st.booleans(),
    frozen_bias=st.booleans(),
    batch_first=st.booleans(),
    calls=st.integers(1, 2),
)
def test_layer_and_rms_norm_match_brute_force(B, lead, normalized, rms, bias, frozen_bias, batch_first, calls):
    torch.manual_seed(0)
    if not rms and math.prod(normalized) == 1:  # x̂ ≡ 0: the reference would hold only round-off
        normalized = [*normalized[:-1], 2]
    layer = nn.RMSNorm(normalized, eps=1e-3) if rms else nn.LayerNorm(normalized, bias=bias)
    randomise(layer)
    if frozen_bias and getattr(layer, "bias", None) is not None:
        layer.bias.requires_grad_(False)
    batch_first = batch_first or not lead  # [B, *normalized] has no sequence dimension to move
    shape = [B, *lead] if batch_first else [lead[0], B, *lead[1:]]
    x = torch.randn(*shape, *normalized)
    assert_matches_reference(Twice(layer, calls), (x,), tanh_loss, B, batch_first=batch_first)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(0, 4),
    kind=st.sampled_from(["group", "instance"]),
    n=st.integers(0, 3),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 2),
    spatial=st.integers(2, 3),
    eval_with_stats=st.booleans(),
    frozen_bias=st.booleans(),
    calls=st.integers(1, 2),
)
def test_group_and_instance_norm_match_brute_force(
    B, kind, n, groups, per_group, spatial, eval_with_stats, frozen_bias, calls
):
    torch.manual_seed(0)
    C = groups * per_group
    if kind == "group":
        per_group += n == 0 and per_group == 1  # a group of one element normalises to exactly 0
        C = groups * per_group
        layer = nn.GroupNorm(groups, C)
    else:
        n = max(n, 1)
        B = max(B, 1)  # PyTorch's affine InstanceNorm itself fails on an empty batch
        layer = [nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d][n - 1](
            C, affine=True, track_running_stats=eval_with_stats
        )
        if eval_with_stats:  # normalise with (non-trivial) running statistics
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
            layer.eval()
    randomise(layer)
    if frozen_bias:
        layer.bias.requires_grad_(False)
    x = torch.randn(B, C, *[spatial] * n)
    assert_matches_reference(Twice(layer, calls), (x,), tanh_loss, B)


def test_frozen_bias_has_no_entry():
    layer = nn.LayerNorm(4)
    layer.bias.requires_grad_(False)
    for mode in ("auto", "ghost", "instantiate"):
        probe = engine_chunk(layer, (torch.randn(3, 2, 4),), lambda y: y.square().sum(), mode)
        assert set(probe.norms_sq) == {"weight"}


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
def test_always_instantiates(mode):
    layer = nn.GroupNorm(2, 4)
    x = torch.randn(3, 4, 5)
    rule = rule_for(layer)
    call = Call(ctx=rule.capture(layer, (x,), {}, True), grad=torch.randn(3, 4, 5))
    assert isinstance(rule.layer_grads(layer, [call], ["weight", "bias"], mode), InstantiatedGrads)


def test_mixed_dtypes_accumulate_in_fp32():
    """Under autocast the captured input and the output gradient may differ in dtype."""
    layer = nn.LayerNorm(8)
    x, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    rule = rule_for(layer)
    exact = rule.per_sample(layer, [Call(ctx=x, grad=g)], ["weight", "bias"])
    low = rule.per_sample(layer, [Call(ctx=x.float(), grad=g.bfloat16())], ["weight", "bias"])
    for n in ("weight", "bias"):
        assert low[n].dtype == torch.float32
        torch.testing.assert_close(low[n], exact[n].float(), rtol=2e-2, atol=2e-2)


def test_unbatched_instance_norm_is_refused():
    layer = nn.InstanceNorm1d(3, affine=True)
    with pytest.raises(ValueError, match="batch"):
        rule_for(layer).capture(layer, (torch.randn(3, 5),), {}, True)
