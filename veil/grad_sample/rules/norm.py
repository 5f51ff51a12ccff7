"""Normalisation layers with an elementwise affine: LayerNorm, RMSNorm, GroupNorm, InstanceNorm.

The output is x̂ ⊙ weight + bias, with x̂ the normalised input, so sample i's gradients are
G_i(weight) = Σ g ⊙ x̂ and G_i(bias) = Σ g, summed over the positions that share one affine
parameter. They are only weight-sized per sample, so the rule always instantiates them. x̂ is
recomputed from the captured input at the end of backward.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Call, Rule, norm_dtype, register_rule

Tensor = torch.Tensor
InstanceNorm = nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d
BATCHED_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


class _AffineNormRule(Rule):
    """Subclasses say how to recompute x̂ and which dimensions share one affine parameter."""

    def input_of(self, ctx) -> Tensor:
        """The captured input (the whole ctx unless a subclass keeps more)."""
        return ctx

    def normalise(self, module: nn.Module, ctx, dtype: torch.dtype) -> Tensor:
        """x̂ in ``dtype``, recomputed from what ``capture`` kept."""
        raise NotImplementedError

    def shared_dims(self, module: nn.Module, g: Tensor) -> Tuple[int, ...]:
        """The dimensions of the output gradient over which one affine parameter is shared."""
        raise NotImplementedError

    def per_sample(self, module: nn.Module, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        """Per-sample weight and bias gradients, summed over calls, in at least fp32."""
        out: Dict[str, Tensor] = {}
        for call in calls:
            dt = norm_dtype(torch.promote_types(self.input_of(call.ctx).dtype, call.grad.dtype))
            g = call.grad.to(dt)
            dims = self.shared_dims(module, g)
            parts = {}
            if "weight" in names:
                parts["weight"] = reduce_sum(g * self.normalise(module, call.ctx, dt), dims)
            if "bias" in names:
                parts["bias"] = reduce_sum(g, dims)
            for n, t in parts.items():
                out[n] = t if n not in out else out[n] + t
        return out


def reduce_sum(t: Tensor, dims: Tuple[int, ...]) -> Tensor:
    """Sum over ``dims``; none means none (``Tensor.sum(())`` would sum everything)."""
    return t.sum(dims) if dims else t


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    """LayerNorm over inputs [B, *, *normalized_shape] (batch position follows ``batch_first``)."""

    sequence_input = True

    def feature_dims(self, module: nn.LayerNorm) -> int:
        return len(module.normalized_shape)

    def normalise(self, module: nn.LayerNorm, x: Tensor, dtype: torch.dtype) -> Tensor:
        return F.layer_norm(x.to(dtype), module.normalized_shape, eps=module.eps)

    def shared_dims(self, module: nn.LayerNorm, g: Tensor) -> Tuple[int, ...]:
        return tuple(range(1, g.dim() - len(module.normalized_shape)))


@register_rule(nn.RMSNorm)
class RMSNormRule(LayerNormRule):
    """RMSNorm: LayerNorm's layout, normalised by the root mean square only, no bias."""

    def normalise(self, module: nn.RMSNorm, x: Tensor, dtype: torch.dtype) -> Tensor:
        return F.rms_norm(x.to(dtype), module.normalized_shape, eps=module.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    """GroupNorm over inputs [B, C, *]: one affine parameter per channel."""

    def normalise(self, module: nn.GroupNorm, x: Tensor, dtype: torch.dtype) -> Tensor:
        return F.group_norm(x.to(dtype), module.num_groups, eps=module.eps)

    def shared_dims(self, module: nn.Module, g: Tensor) -> Tuple[int, ...]:
        return tuple(range(2, g.dim()))


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(GroupNormRule):
    """InstanceNorm with affine=True over batched inputs [B, C, *]."""

    def capture(self, module: InstanceNorm, args: tuple, kwargs: dict, batch_first: bool):
        """The input, and the running statistics when forward used them (eval with tracked stats)."""
        x = args[0]
        if x.dim() != BATCHED_DIMS[type(module)]:
            raise ValueError(
                f"{type(module).__name__} got an input of shape {tuple(x.shape)} without a batch dimension; "
                "per-sample gradients need batched inputs [B, C, ...] (add one with x.unsqueeze(0))."
            )
        use_input_stats = module.training or not module.track_running_stats
        stats = None if use_input_stats else (module.running_mean.clone(), module.running_var.clone())
        return x.detach(), stats

    def input_of(self, ctx: Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]) -> Tensor:
        return ctx[0]

    def normalise(self, module: InstanceNorm, ctx: Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]],
                  dtype: torch.dtype) -> Tensor:
        x, stats = ctx
        mean, var = (None, None) if stats is None else (s.to(dtype) for s in stats)
        return F.instance_norm(x.to(dtype), mean, var, use_input_stats=stats is None, eps=module.eps)
