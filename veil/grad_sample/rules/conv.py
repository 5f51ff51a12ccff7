"""nn.Conv1d/2d/3d: per-sample gradients, ghost norms and clipped sums.

A convolution is a Linear layer applied at every output position to the unfolded input patch:
with U_i the unfolded (padded) input of sample i, shape [k, L] per group, and g_i its output
gradient, shape [p, L] per group, the per-sample weight gradient is G_i = g_i U_iᵀ. Forward keeps
only the raw input; the padding (any ``padding_mode``) is applied explicitly afterwards, so the
convolution is then one without padding.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Call, InstantiatedGrads, LayerGrads, Rule, norm_dtype, register_rule, sq_norms

Tensor = torch.Tensor
Conv = nn.modules.conv._ConvNd

_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def padding_pairs(module: Conv) -> List[Tuple[int, int]]:
    """(before, after) padding of each spatial dimension, as the module's forward applies it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":  # PyTorch puts the odd extra element after
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def pad_input(module: Conv, x: Tensor) -> Tensor:
    """The input with the module's padding applied, so the convolution needs no more padding."""
    pairs = padding_pairs(module)
    if not any(a or b for a, b in pairs):
        return x
    flat = [v for pair in reversed(pairs) for v in pair]  # F.pad lists the last dimension first
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode)


def unfold(module: Conv, x: Tensor) -> Tensor:
    """Padded input [B, C_in, *S] -> patches [B, groups, C_in/groups·prod(kernel), L]."""
    n = len(module.kernel_size)
    for i, (k, d, s) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends a window dim, spatial dim i becomes outputs
    x = x[(...,) + tuple(slice(None, None, d) for d in module.dilation)]  # keep every d-th tap
    B, C = x.shape[:2]
    L = math.prod(x.shape[2 : 2 + n])
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))  # [B, C, *kernel, *out]
    return x.reshape(B, module.groups, C // module.groups * math.prod(module.kernel_size), L)


def grouped_grad(module: Conv, g: Tensor) -> Tensor:
    """Output gradient [B, C_out, *out] -> [B, groups, C_out/groups, L]."""
    return g.reshape(g.shape[0], module.groups, module.out_channels // module.groups, math.prod(g.shape[2:]))


def _sum(ts: List[Tensor]) -> Tensor:
    total = ts[0]
    for t in ts[1:]:
        total = total + t
    return total


def _cat_first(ts: List[Tensor], like: Tensor) -> Tensor:
    if not ts:
        return like.new_zeros(0)
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _cat_last(ts: List[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, -1)


#: Norms are computed a few samples at a time: at most this many patch elements (ghost) or weight
#: gradient elements (per-sample) at once, 2 MiB of float32. A layer whose B per-sample gradients fit
#: in one such chunk keeps them (its clipped sum is then a cheap weighted sum of them).
CHUNK_ELEMENTS = 1 << 19


def ghost_is_cheaper(L: int, k: int, p: int) -> bool:
    """DESIGN.md's cost model per group and sample, in multiply-add equivalents, with the constants
    measured on a 2-core x86 CPU (torch 2.13, conv shapes from 1→16 to 128→256 channels):

    * per-sample gradients: 2·L·p·k (B small weight-gradient products run at about half the speed
      of one large one) + 10·p·k (their norms, chunk by chunk while in cache) + L·p·k (the clipped sum,
      a weight-gradient convolution of the scaled output gradients);
    * ghost: 2·L²·(p+k) (the two Gram matrices) + 100·L·k (the strided copy of the patches) + L·p·k
      (the same clipped sum).
    """
    per_sample = 2 * L * p * k + 10 * p * k
    ghost = 2 * L * L * (p + k) + 100 * L * k
    return ghost < per_sample


def prepare(module: Conv, calls: List[Call]) -> Tuple[List[Tensor], List[Tensor]]:
    """Padded inputs and output gradients of all calls, in at least fp32 (their dtypes may differ
    under autocast; norms and clipped sums accumulate in full precision)."""
    dt = norm_dtype(torch.promote_types(calls[0].ctx.dtype, calls[0].grad.dtype))
    return [pad_input(module, c.ctx.to(dt)) for c in calls], [c.grad.to(dt) for c in calls]


def conv_per_sample(module: Conv, xs: List[Tensor], gs: List[Tensor], names: List[str]) -> Dict[str, Tensor]:
    """Per-sample gradients, summed over calls; ``xs`` are the padded inputs."""
    out: Dict[str, Tensor] = {}
    if "weight" in names:
        out["weight"] = _sum([weight_per_sample(module, x, g) for x, g in zip(xs, gs)])
    if "bias" in names:
        out["bias"] = bias_per_sample(gs)
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: Per-sample weight gradients use the forward-convolution form when a group has at most this many
#: input channels (measured on a 2-core x86 CPU, 1 thread: 1→16 channels 8x8 on 28x28, B=256:
#: 1.8 ms against 3.0 ms for the weight-gradient form; 16→32 channels: 9.7 ms against 2.1 ms).
FORWARD_FORM_MAX_IN_CHANNELS = 3


def weight_per_sample(module: Conv, x: Tensor, g: Tensor, form: str = "auto") -> Tensor:
    """Per-sample weight gradients [B, *weight.shape] of one call; ``x`` is the padded input.

    Two exact forms, neither of which builds the unfolded patches: "backward", one weight-gradient
    convolution in which every sample is a group of its own; "forward", one forward convolution of
    the input (input channels as the batch) with each sample's output gradient as a dilated
    kernel, faster when a group has few input channels. "auto" picks between them."""
    B = x.shape[0]
    if B == 0:
        return x.new_zeros((0, *module.weight.shape))
    if form == "auto":
        small = module.in_channels // module.groups <= FORWARD_FORM_MAX_IN_CHANNELS
        form = "forward" if small else "backward"
    if form == "forward":
        return _weight_per_sample_forward(module, x, g)
    weight_grad = _WEIGHT_GRAD[len(module.kernel_size)]
    shape = (B * module.out_channels, *module.weight.shape[1:])
    w = weight_grad(x.reshape(1, B * module.in_channels, *x.shape[2:]), shape,
                    g.reshape(1, B * module.out_channels, *g.shape[2:]),
                    stride=module.stride, dilation=module.dilation, groups=B * module.groups)
    return w.reshape(B, *module.weight.shape)


def _weight_per_sample_forward(module: Conv, x: Tensor, g: Tensor) -> Tensor:
    """G_i[o, c, κ] = Σ_pos g_i[o, pos] x_i[c, pos·stride + κ·dilation]: a convolution of x_i with
    g_i as a kernel dilated by the stride, evaluated at the offsets κ·dilation."""
    B, n, G = x.shape[0], len(module.kernel_size), module.groups
    c_in = module.in_channels // G
    inp = x.reshape(B, G, c_in, *x.shape[2:]).movedim(2, 0).reshape(c_in, B * G, *x.shape[2:])
    kernel = g.reshape(B * module.out_channels, 1, *g.shape[2:])
    out = _CONV[n](inp, kernel, stride=1, dilation=module.stride, groups=B * G)
    taps = tuple(slice(0, d * (k - 1) + 1, d) for d, k in zip(module.dilation, module.kernel_size))
    out = out[(...,) + taps]  # [c_in, B·C_out, *kernel]
    return out.reshape(c_in, B, module.out_channels, *module.kernel_size).movedim(0, 2)


def bias_per_sample(gs: List[Tensor]) -> Tensor:
    """Σ of the output gradients over positions and calls: [B, C_out]."""
    return sum(g.sum(tuple(range(2, g.dim()))) for g in gs)


def scale_samples(g: Tensor, c: Tensor) -> Tensor:
    """g with sample i scaled by c[i]."""
    return g * c.to(g.dtype).view(-1, *[1] * (g.dim() - 1))


class ConvGhostGrads(LayerGrads):
    """Keeps only the padded inputs and output gradients; the clipped sum is one weight-gradient
    convolution of the scaled output gradients.

    The weight norms come, a few samples at a time (so temporaries stay small and in cache), either
    from the L×L Gram matrices of the unfolded patches (``norms="gram"``: the ghost norm) or from the
    samples' weight gradients themselves, formed and dropped chunk by chunk (``norms="per_sample"``:
    instantiation's arithmetic without holding B copies of the weight).
    """

    def __init__(self, module: Conv, xs: List[Tensor], gs: List[Tensor], names: List[str], norms: str = "gram",
                 transform: Optional[Callable[[Tensor], Tensor]] = None):
        """``transform``: a linear map applied to every weight gradient (per sample and summed), for
        layers whose parameter reaches the convolution through a fixed linear reparametrisation
        (weight standardisation's Jacobian); it needs ``norms="per_sample"``."""
        if transform is not None and norms != "per_sample":
            raise ValueError("a weight-gradient transform needs the per-sample norms")
        self.module, self.xs, self.gs, self.names = module, xs, gs, names
        self.transform = transform or (lambda t: t)
        self.norms_sq = {}
        if "weight" in names:
            B = xs[0].shape[0]
            L = sum(math.prod(g.shape[2:]) for g in gs)
            k = module.weight[0].numel()
            per = L * k * module.groups if norms == "gram" else module.weight.numel()
            step = max(1, CHUNK_ELEMENTS // max(1, per))
            parts = []
            for i in range(0, B, step):
                if norms == "gram":
                    u = _cat_last([unfold(module, x[i : i + step]) for x in xs])
                    g = _cat_last([grouped_grad(module, g[i : i + step]) for g in gs])
                    uu = torch.matmul(u.transpose(-1, -2), u)
                    gg = torch.matmul(g.transpose(-1, -2), g)
                    parts.append((uu * gg).sum((1, 2, 3)))
                else:
                    w = _sum([weight_per_sample(module, x[i : i + step], g[i : i + step]) for x, g in zip(xs, gs)])
                    parts.append(sq_norms(self.transform(w)))
            self.norms_sq["weight"] = _cat_first(parts, xs[0])
        if "bias" in names:
            self.gsum = bias_per_sample(gs)
            self.norms_sq["bias"] = sq_norms(self.gsum)

    def clipped_sum(self, factors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out = {}
        m = self.module
        if "weight" in factors:
            c = factors["weight"]
            weight_grad = _WEIGHT_GRAD[len(m.kernel_size)]
            out["weight"] = self.transform(_sum([
                weight_grad(x, m.weight.shape, scale_samples(g, c), stride=m.stride, dilation=m.dilation, groups=m.groups)
                for x, g in zip(self.xs, self.gs)
            ]))
        if "bias" in factors:
            out["bias"] = factors["bias"].to(self.gsum.dtype) @ self.gsum
        return out

    def per_sample(self) -> Dict[str, Tensor]:
        out = conv_per_sample(self.module, self.xs, self.gs, self.names)
        if "weight" in out:
            out["weight"] = self.transform(out["weight"])
        return out


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Conv1d/2d/3d with any stride, padding, padding_mode, dilation and groups; batch in dim 0."""

    def capture(self, module: Conv, args: tuple, kwargs: dict, batch_first: bool) -> Tensor:
        x = args[0]
        if x.dim() != len(module.kernel_size) + 2:
            raise ValueError(
                f"{type(module).__name__} got an input of shape {tuple(x.shape)} without a batch dimension; "
                "per-sample gradients need batched inputs [B, C, ...] (add one with x.unsqueeze(0))."
            )
        return x.detach()

    def per_sample(self, module: Conv, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        return conv_per_sample(module, *prepare(module, calls), names)

    def layer_grads(self, module: Conv, calls: List[Call], names: List[str], mode: str) -> LayerGrads:
        xs, gs = prepare(module, calls)
        L = sum(math.prod(g.shape[2:]) for g in gs)
        k = module.weight[0].numel()
        p = module.out_channels // module.groups
        if mode == "ghost" or (mode == "auto" and ghost_is_cheaper(L, k, p)):
            return ConvGhostGrads(module, xs, gs, names)
        if mode == "auto" and xs[0].shape[0] * module.weight.numel() > CHUNK_ELEMENTS:
            return ConvGhostGrads(module, xs, gs, names, norms="per_sample")
        return InstantiatedGrads(conv_per_sample(module, xs, gs, names))
