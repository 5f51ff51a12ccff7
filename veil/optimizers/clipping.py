"""Clipping strategies: small objects that turn per-sample norms into per-sample clip factors.

A strategy sees one chunk of samples at a time (one backward pass) and returns, for every
parameter entry, the factor c_i that multiplies sample i's gradient. It also says how much noise
the summed gradient needs (its sensitivity times σ).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..grad_sample.grad_sample_module import ParamEntry

Tensor = torch.Tensor


def clip_factor(norm: Tensor, bound: float) -> Tensor:
    """min(1, C/‖g‖) exactly: samples within the bound keep factor 1; no epsilon in the denominator."""
    return torch.where(norm > bound, bound / norm, torch.ones_like(norm))


class ClippingStrategy:
    """Base class. ``max_grad_norm`` is the bound C that sets the noise scale."""

    max_grad_norm: float

    def factors(self, entries: List[ParamEntry], batch_size: int) -> List[Tensor]:
        raise NotImplementedError

    def sensitivity(self) -> float:
        """L2 sensitivity of the clipped sum to one sample: the noise std is σ times this."""
        return self.max_grad_norm

    def on_step(self, generator=None) -> None:
        """Called once per logical batch, after noise (adaptive strategies update here)."""

    def state_dict(self) -> dict:
        return {"max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: dict) -> None:
        self.max_grad_norm = state["max_grad_norm"]


def total_norm(entries: List[ParamEntry], batch_size: int, dtype=torch.float32) -> Tensor:
    if not entries:
        return torch.zeros(batch_size, dtype=dtype)
    return torch.stack([e.norms_sq for e in entries]).sum(0).sqrt()


class FlatClipping(ClippingStrategy):
    """All parameters together: c_i = min(1, C/‖G_i‖) with G_i the sample's whole gradient."""

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = float(max_grad_norm)

    def factors(self, entries: List[ParamEntry], batch_size: int) -> List[Tensor]:
        c = clip_factor(total_norm(entries, batch_size), self.max_grad_norm)
        return [c] * len(entries)
