"""Matrix products of the engine and of the DP layers, on oneDNN where torch offers it.

On CPU, torch's ``mm``/``F.linear`` call MKL's sgemm; on some CPUs (AMD EPYC: MKL's sgemm is not
tuned for them) oneDNN's GEMM is about twice as fast. Measured on the 2-core AMD EPYC this project is
benchmarked on, one thread: the clipped sum (c⊙g)ᵀa of a 1024×784 Linear at B=256 took 3.7 ms with
``addmm_`` and 1.8 ms on oneDNN; a 512×128 product over 1024 rows 1.3 ms against 0.74 ms. The engine
uses it for clipped sums, and the DP layers for their own products, when it applies (CPU,
float32/bfloat16, oneDNN enabled); elsewhere (float64, CUDA, torch without oneDNN) these are the
usual torch products. Set ``veil.grad_sample.gemm.USE_ONEDNN = False`` to always use torch's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

USE_ONEDNN = True

try:  # a private op of torch (used by Inductor's CPU backend); absent in some builds
    _LINEAR = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # pragma: no cover
    _LINEAR = None


def onednn_applies(x: Tensor) -> bool:
    return (USE_ONEDNN and _LINEAR is not None and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and torch._C._get_mkldnn_enabled())


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """``x @ w.T + b`` for tensors that need no autograd."""
    tracked = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    if not tracked and onednn_applies(x) and w.dtype == x.dtype and (b is None or b.dtype == x.dtype):
        return _LINEAR(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def add_tn_(out: Tensor, g: Tensor, a: Tensor, c: Tensor) -> None:
    """``out += gᵀ diag(c) a`` for row matrices g [N, p], a [N, d] and row weights c [N]: the clipped
    sum of a Linear layer's weight gradients. The smaller of g and a is scaled."""
    N, p = g.shape
    d = a.shape[1]
    if N == 0:
        return
    c = c.to(g.dtype).view(N, 1)
    big = N * p * d >= 1 << 16  # oneDNN's call overhead (~25 us) outweighs tiny products
    # oneDNN writes a p x d result and transposed copies before the add (a 1024x784 layer at B = 256:
    # 10 MiB of peak memory); it is used only where that stays within the layer's own activations
    lean = p * d <= N * (p + d)
    if not (big and lean and onednn_applies(g) and out.dtype == g.dtype == a.dtype
            and g.is_contiguous() and a.is_contiguous()):
        # oneDNN reads transposed row matrices well only when they are dense (a strided slice such as
        # out[:, -1] of a sequence took 3 ms for an 18x64 by 64x128 product)
        if d <= p:
            out.addmm_(g.t(), a * c)
        else:
            out.addmm_((g * c).t(), a)
        return
    # oneDNN computes X Wᵀ and copies a transposed X first. Measured (one and two threads): writing the
    # scaled smaller factor already transposed as X wins unless the result then needs a transposed add
    # larger than the copy it saves (d ≤ p and d ≥ N, e.g. a 1024x784 layer at B = 256).
    if d > p:
        x = torch.empty(p, N, dtype=g.dtype, device=g.device)
        torch.mul(g.t(), c.t(), out=x)
        out.add_(_LINEAR(x, a.t(), None, "none", [], ""))
    elif d < N:
        x = torch.empty(d, N, dtype=g.dtype, device=g.device)
        torch.mul(a.t(), c.t(), out=x)
        out.t().add_(_LINEAR(x, g.t(), None, "none", [], ""))
    else:
        out.add_(_LINEAR(g.t(), (a * c).t(), None, "none", [], ""))
