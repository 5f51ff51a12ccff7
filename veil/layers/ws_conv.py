"""Weight-standardised convolutions (Qiao et al. 2019), with exact per-sample clipping.

Each output channel's weight is standardised over its fan-in before use,
``ŵ_o = (w_o - mean(w_o)) / sqrt(var(w_o) + eps)`` (biased variance), as in the GroupNorm + weight
standardisation networks De et al. (2022) trained with DP-SGD. The parameter is ``w``; its
per-sample gradients are those of ``ŵ`` (the convolution rule's) mapped through the standardisation's
Jacobian, which depends on ``w`` only: for one channel with fan-in n and upstream gradient v,
``∂L/∂w = (v - mean(v) - ŵ·(ŵ·v)/n) / σ``. The map is linear, so the clipped sum is the convolution
rule's clipped sum mapped once.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..grad_sample.rules.base import Call, LayerGrads, register_rule
from ..grad_sample.rules.conv import ConvGhostGrads, ConvRule, conv_per_sample, prepare


class _WeightStandardized:
    """The standardisation, shared by WSConv1d/2d/3d (placed before the ``nn.Conv*d`` base)."""

    weight: nn.Parameter

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def _standardisation(self) -> Tuple[Tensor, Tensor]:
        """(ŵ [O, n], σ [O, 1]) of the current weight, flattened per output channel."""
        w = self.weight.reshape(self.weight.shape[0], -1)
        var, mean = torch.var_mean(w, dim=1, unbiased=False, keepdim=True)
        sigma = torch.sqrt(var + self.eps)
        return (w - mean) / sigma, sigma

    def standardized_weight(self) -> Tensor:
        """The weight the convolution uses."""
        w_hat, _ = self._standardisation()
        return w_hat.reshape(self.weight.shape)

    def weight_grad_map(self) -> Callable[[Tensor], Tensor]:
        """The linear map from gradients with respect to ``ŵ`` ([..., *weight.shape]) to gradients with
        respect to ``weight``, for the current weight (its standardisation is computed once here)."""
        with torch.no_grad():
            w_hat, sigma = self._standardisation()
        shape, n = self.weight.shape, w_hat.shape[1]

        def apply(v: Tensor) -> Tensor:
            wh, sg = w_hat.to(v.dtype), sigma.to(v.dtype)
            vf = v.reshape(*v.shape[: v.dim() - len(shape)], *wh.shape)
            return ((vf - vf.mean(-1, keepdim=True) - wh * (vf * wh).sum(-1, keepdim=True) / n) / sg).reshape(v.shape)

        return apply


class WSConv1d(_WeightStandardized, nn.Conv1d):
    """``nn.Conv1d`` with weight standardisation (keyword ``eps``, default 1e-5, added to the variance)."""


class WSConv2d(_WeightStandardized, nn.Conv2d):
    """``nn.Conv2d`` with weight standardisation (keyword ``eps``, default 1e-5, added to the variance)."""


class WSConv3d(_WeightStandardized, nn.Conv3d):
    """``nn.Conv3d`` with weight standardisation (keyword ``eps``, default 1e-5, added to the variance)."""


@register_rule(WSConv1d, WSConv2d, WSConv3d)
class WSConvRule(ConvRule):
    """The convolution rule's per-sample gradients of ``ŵ``, mapped to ``w``. Norms always come from
    per-sample gradients (formed a few samples at a time): the map mixes a channel's taps, so the
    ghost norm of ``ŵ``'s gradients does not give ``w``'s."""

    def per_sample(self, module: nn.Module, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        out = conv_per_sample(module, *prepare(module, calls), names)
        if "weight" in out:
            out["weight"] = module.weight_grad_map()(out["weight"])
        return out

    def layer_grads(self, module: nn.Module, calls: List[Call], names: List[str], mode: str) -> LayerGrads:
        xs, gs = prepare(module, calls)
        return ConvGhostGrads(module, xs, gs, names, norms="per_sample", transform=module.weight_grad_map())
