"""Clipping strategies: small objects that turn per-sample norms into per-sample clip factors.

A strategy sees one chunk of samples at a time (one backward pass) and returns, for every parameter
entry, the factor c_i that multiplies sample i's gradient. It also says how much noise the summed
gradient needs (``noise_std``), and may adapt itself once per step (``on_step``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Union

import torch

from ..grad_sample.grad_sample_module import ParamEntry

Tensor = torch.Tensor


def clip_factor(norm: Tensor, bound: float) -> Tensor:
    """min(1, C/‖g‖) exactly: samples within the bound keep factor 1; no epsilon in the denominator."""
    return torch.where(norm > bound, bound / norm, torch.ones_like(norm))


def total_norm(entries: List[ParamEntry], batch_size: int) -> Tensor:
    if not entries:
        return torch.zeros(batch_size)
    return torch.stack([e.norms_sq for e in entries]).sum(0).sqrt()


class ClippingStrategy:
    """Base class. ``max_grad_norm`` is the bound C that sets the noise scale."""

    max_grad_norm: float

    def factors(self, entries: List[ParamEntry], batch_size: int) -> List[Tensor]:
        raise NotImplementedError

    def noise_std(self, noise_multiplier: float) -> float:
        """Std of the Gaussian noise added to the clipped sum: σ times the L2 sensitivity."""
        return noise_multiplier * self.max_grad_norm

    def on_step(self, optimizer) -> None:
        """Called once per logical batch after the update (adaptive strategies learn here)."""

    def state_dict(self) -> dict:
        return {"max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: dict) -> None:
        self.max_grad_norm = state["max_grad_norm"]


class FlatClipping(ClippingStrategy):
    """All parameters together: c_i = min(1, C/‖G_i‖) with G_i the sample's whole gradient."""

    def __init__(self, max_grad_norm: float):
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)

    def factors(self, entries, batch_size):
        c = clip_factor(total_norm(entries, batch_size), self.max_grad_norm)
        return [c] * len(entries)


class PerLayerClipping(ClippingStrategy):
    """Each parameter group (or each parameter) clipped to its own bound C_k; noise σ·‖C‖₂.

    ``bounds`` has one entry per parameter group of the optimizer, or one per parameter.
    """

    def __init__(self, bounds: Sequence[float], param_groups: List[dict]):
        groups = [list(g["params"]) for g in param_groups]
        params = [p for g in groups for p in g]
        bounds = [float(b) for b in bounds]
        if any(b <= 0 for b in bounds):
            raise ValueError(f"every max_grad_norm must be > 0, got {bounds}")
        if len(bounds) == len(groups):
            self.slot = {id(p): k for k, g in enumerate(groups) for p in g}
        elif len(bounds) == len(params):
            self.slot = {id(p): k for k, p in enumerate(params)}
        else:
            raise ValueError(
                f"clipping='per_layer' needs one max_grad_norm per parameter group ({len(groups)}) or per "
                f"parameter ({len(params)}); got {len(bounds)}"
            )
        self.bounds = bounds

    @property
    def max_grad_norm(self) -> float:
        return math.sqrt(sum(b * b for b in self.bounds))

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        scale = value / self.max_grad_norm
        self.bounds = [b * scale for b in self.bounds]

    def factors(self, entries, batch_size):
        by_slot: Dict[int, List[ParamEntry]] = {}
        for e in entries:
            by_slot.setdefault(self.slot[id(e.param)], []).append(e)
        c = {k: clip_factor(total_norm(es, batch_size), self.bounds[k]) for k, es in by_slot.items()}
        return [c[self.slot[id(e.param)]] for e in entries]

    def state_dict(self) -> dict:
        return {"bounds": list(self.bounds)}

    def load_state_dict(self, state: dict) -> None:
        self.bounds = list(state["bounds"])


class AutomaticClipping(ClippingStrategy):
    """Automatic clipping (Bu et al. 2022): every sample scaled by C/(‖g_i‖ + γ), so ‖c_i g_i‖ < C."""

    def __init__(self, max_grad_norm: float = 1.0, gamma: float = 0.01):
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.max_grad_norm = float(max_grad_norm)
        self.gamma = float(gamma)

    def factors(self, entries, batch_size):
        c = self.max_grad_norm / (total_norm(entries, batch_size) + self.gamma)
        return [c] * len(entries)


class AdaptiveClipping(ClippingStrategy):
    """Quantile-based adaptive clipping (Andrew et al. 2021).

    After each step C ← C·exp(−η·(b̃ − γ)), clamped to [min_clipbound, max_clipbound], where b̃ is the
    noisy fraction of samples whose norm was ≤ C (noise std ``unclipped_num_std``, divided by the
    expected batch size) and γ the target quantile. To keep the overall privacy equal to that of the
    optimizer's σ (which the accountant records), the gradient noise uses
    σ_Δ = (σ⁻² − (2·unclipped_num_std)⁻²)^(−1/2).
    """

    def __init__(self, max_grad_norm: float, *, target_unclipped_quantile: float = 0.5,
                 clipbound_learning_rate: float = 0.2, max_clipbound: float = 1e8, min_clipbound: float = 1e-8,
                 unclipped_num_std: float = 0.0):
        if not 0 <= target_unclipped_quantile <= 1:
            raise ValueError(f"target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile}")
        if min_clipbound > max_clipbound:
            raise ValueError("min_clipbound must not exceed max_clipbound")
        self.max_grad_norm = float(max_grad_norm)
        self.target = target_unclipped_quantile
        self.lr = clipbound_learning_rate
        self.max_clipbound, self.min_clipbound = max_clipbound, min_clipbound
        self.unclipped_num_std = unclipped_num_std
        self.unclipped = 0.0

    def grad_noise_multiplier(self, noise_multiplier: float) -> float:
        if noise_multiplier == 0:
            return 0.0
        if self.unclipped_num_std <= 0 or 2 * self.unclipped_num_std <= noise_multiplier:
            raise ValueError(
                "adaptive clipping needs unclipped_num_std > noise_multiplier / 2 (it takes part of the privacy "
                f"budget); got unclipped_num_std={self.unclipped_num_std}, noise_multiplier={noise_multiplier}"
            )
        return (noise_multiplier ** -2 - (2 * self.unclipped_num_std) ** -2) ** -0.5

    def noise_std(self, noise_multiplier: float) -> float:
        return self.grad_noise_multiplier(noise_multiplier) * self.max_grad_norm

    def factors(self, entries, batch_size):
        norm = total_norm(entries, batch_size)
        self.unclipped += float((norm <= self.max_grad_norm).sum())
        c = clip_factor(norm, self.max_grad_norm)
        return [c] * len(entries)

    def on_step(self, optimizer) -> None:
        count = self.unclipped
        if optimizer.noise_multiplier > 0:
            if optimizer.secure_mode:
                from ..utils.secure_rng import secure_normal

                count += float(secure_normal((1,), self.unclipped_num_std, dtype=torch.float64))
            else:
                count += float(torch.normal(0.0, self.unclipped_num_std, (1,), generator=optimizer.generator))
        frac = count / (optimizer.expected_batch_size or 1)
        c = self.max_grad_norm * math.exp(-self.lr * (frac - self.target))
        self.max_grad_norm = min(self.max_clipbound, max(self.min_clipbound, c))
        self.unclipped = 0.0

    def state_dict(self) -> dict:
        return {"max_grad_norm": self.max_grad_norm, "unclipped": self.unclipped}

    def load_state_dict(self, state: dict) -> None:
        self.max_grad_norm = state["max_grad_norm"]
        self.unclipped = state.get("unclipped", 0.0)


def make_strategy(clipping: Union[str, ClippingStrategy], max_grad_norm, param_groups: List[dict],
                  **options) -> ClippingStrategy:
    """The strategy named by ``clipping`` ("flat", "per_layer", "adaptive", "automatic")."""
    if isinstance(clipping, ClippingStrategy):
        return clipping
    if clipping == "flat":
        return FlatClipping(max_grad_norm)
    if clipping == "per_layer":
        bounds = max_grad_norm if isinstance(max_grad_norm, (list, tuple)) else [max_grad_norm] * len(param_groups)
        return PerLayerClipping(bounds, param_groups)
    if clipping == "adaptive":
        keys = ("target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound", "min_clipbound",
                "unclipped_num_std")
        return AdaptiveClipping(max_grad_norm, **{k: options[k] for k in keys if k in options})
    if clipping == "automatic":
        return AutomaticClipping(max_grad_norm, **({"gamma": options["gamma"]} if "gamma" in options else {}))
    raise ValueError(f"clipping must be 'flat', 'per_layer', 'adaptive' or 'automatic', got {clipping!r}")
