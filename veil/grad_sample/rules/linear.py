"""nn.Linear: per-sample gradients, ghost norms and clipped sums for inputs [B, *, d]."""
from __future__ import annotations

import math

from typing import Dict, List

import torch
from torch import nn

from .. import state
from ..gemm import add_tn_
from .base import Call, InstantiatedGrads, LayerGrads, Rule, norm_dtype, register_rule, sq_norms

Tensor = torch.Tensor


def stack_calls(calls: List[Call], d_in: int, d_out: int):
    """Inputs and output gradients of all calls, as [B, T, d] and [B, T, p] (calls joined along T),
    in at least fp32 so that norms and clipped sums accumulate in full precision under autocast."""
    dt = norm_dtype(torch.promote_types(calls[0].ctx.dtype, calls[0].grad.dtype))
    a = [flat3(c.ctx).to(dt) for c in calls]
    g = [flat3(c.grad).to(dt) for c in calls]
    if len(calls) == 1:
        return a[0], g[0]
    return torch.cat(a, 1), torch.cat(g, 1)


def flat3(t: Tensor) -> Tensor:
    """[B, *, d] -> [B, T, d], where T is the product of the middle dimensions (1 if none)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def ghost_is_cheaper(T: int, d: int, p: int) -> bool:
    """DESIGN.md's cost model: ghost costs ~T²(p+d) per sample, instantiating ~T·p·d."""
    return T * (p + d) <= p * d


def gram(t: Tensor) -> Tensor:
    """[B, T, k] -> [B, T, T]: the per-sample Gram matrices t_i t_iᵀ."""
    return torch.bmm(t, t.transpose(1, 2))


def linear_ghost_norm_sq(a: Tensor, g: Tensor) -> Tensor:
    """‖g_iᵀ a_i‖_F² for every sample, without forming g_iᵀ a_i."""
    if a.shape[1] == 1:
        return sq_norms(a[:, 0]) * sq_norms(g[:, 0])
    aa = state.shared_product("gram", a, gram)
    gg = state.shared_product("gram", g, gram)
    return (aa * gg).sum((1, 2))


class LinearGhostGrads(LayerGrads):
    """Weight gradient kept as (a, g); the clipped sum is one matmul (c⊙g)ᵀa."""

    def __init__(self, a: Tensor, g: Tensor, names: List[str]):
        self.a, self.g, self.names = a, g, names
        self.norms_sq = {}
        if "weight" in names:
            self.norms_sq["weight"] = linear_ghost_norm_sq(a, g)
        if "bias" in names:
            self.gsum = g.sum(1)
            self.norms_sq["bias"] = sq_norms(self.gsum)

    def _weight_sum_(self, c: Tensor, out: Tensor) -> None:
        """out += (c ⊙ g)ᵀ a."""
        B, T, p = self.g.shape
        cT = c.repeat_interleave(T) if T > 1 else c
        add_tn_(out, self.g.reshape(B * T, p), self.a.reshape(B * T, self.a.shape[-1]), cT)

    def clipped_sum(self, factors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out = {}
        if "weight" in factors:
            out["weight"] = self.g.new_zeros(self.g.shape[-1], self.a.shape[-1])
            self._weight_sum_(factors["weight"], out["weight"])
        if "bias" in factors:
            out["bias"] = factors["bias"] @ self.gsum
        return out

    def per_sample(self) -> Dict[str, Tensor]:
        return linear_per_sample(self.a, self.g, self.names)

    def add_clipped_sum_(self, name: str, factors: Tensor, out: Tensor) -> None:
        if name != "weight" or out.dtype != self.g.dtype:
            return super().add_clipped_sum_(name, factors, out)
        self._weight_sum_(factors, out)


def linear_per_sample(a: Tensor, g: Tensor, names: List[str]) -> Dict[str, Tensor]:
    out = {}
    if "weight" in names:
        out["weight"] = torch.bmm(g.transpose(1, 2), a)
    if "bias" in names:
        out["bias"] = g.sum(1)
    return out


@register_rule(nn.Linear)
class LinearRule(Rule):
    sequence_input = True

    def per_sample(self, module: nn.Linear, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        a, g = stack_calls(calls, module.in_features, module.out_features)
        return linear_per_sample(a, g, names)

    def layer_grads(self, module: nn.Linear, calls: List[Call], names: List[str], mode: str) -> LayerGrads:
        a, g = stack_calls(calls, module.in_features, module.out_features)
        return linear_layer_grads(a, g, names, mode)


def linear_layer_grads(a: Tensor, g: Tensor, names: List[str], mode: str) -> LayerGrads:
    """Norms and clipped sums of a Linear with inputs ``a`` [B, T, d] and output gradients ``g``
    [B, T, p]: ghost norms in "ghost" mode, or in "auto" when the cost model says they are cheaper;
    instantiated per-sample gradients otherwise."""
    if mode == "ghost" or (mode == "auto" and ghost_is_cheaper(a.shape[1], a.shape[2], g.shape[2])):
        return LinearGhostGrads(a, g, names)
    return InstantiatedGrads(linear_per_sample(a, g, names))
