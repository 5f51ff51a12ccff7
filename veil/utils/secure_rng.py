"""Cryptographically secure uniforms and Gaussians from the operating system's entropy source.

Bytes come from ``os.urandom`` (the kernel's CSPRNG, getrandom(2) on Linux); no third-party package.
Uniforms use 53 random bits each; Gaussians use the Box–Muller transform in float64 on such
uniforms, then are cast to the requested dtype. The cost is dominated by the kernel's generator:
about 8 bytes per uniform and 16 per Gaussian pair (see docs/secure_mode.md for measurements).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

_TWO53 = float(2**53)


def _uniform53(n: int) -> np.ndarray:
    """n floats uniform on (0, 1], from 53 secure random bits each."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) + 1.0) / _TWO53


def secure_uniform(n: int) -> torch.Tensor:
    """n secure uniforms on (0, 1] as a float64 tensor."""
    return torch.from_numpy(_uniform53(n))


def secure_normal(shape: Sequence[int], std: float, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Secure N(0, std²) samples of the given shape."""
    n = int(math.prod(shape))
    m = (n + 1) // 2
    u = _uniform53(2 * m)
    r = np.sqrt(-2.0 * np.log(u[:m]))
    theta = (2.0 * np.pi) * u[m:]
    z = np.empty(2 * m)
    z[:m] = r * np.cos(theta)
    z[m:] = r * np.sin(theta)
    out = torch.from_numpy(z[:n] * std).reshape(tuple(shape))
    return out.to(dtype=dtype, device=device)
