"""The matmuls inside the recurrent scans, on oneDNN where torch offers it.

nn.LSTM / nn.GRU / nn.RNN run on oneDNN on CPU; on some CPUs (e.g. AMD EPYC, where MKL's sgemm is
not tuned) oneDNN's small GEMMs are about twice as fast as ``torch.mm``. The DP recurrences use the
same kernel for their per-step products when it applies (CPU, float32/bfloat16, no autograd), so a
DP step is compared like for like. Elsewhere (float64, CUDA, torch without oneDNN) this is F.linear.
Set ``veil.layers._gemm.USE_ONEDNN = False`` to always use F.linear.
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
    if onednn_applies(x) and w.dtype == x.dtype and (b is None or b.dtype == x.dtype):
        return _LINEAR(x, w, b, "none", [], "")
    return F.linear(x, w, b)
