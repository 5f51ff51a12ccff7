"""Gaussian noise for the summed gradients, drawn fast: one flat buffer filled by several threads.

torch draws normals on CPU with one thread per generator, so a step's noise (one draw per
parameter) is split into slices, each filled in place by its own generator on its own thread.
The generators are seeded per step from the user's generator (or torch's default one), so a seeded
run is reproducible. In secure mode the OS's cryptographic generator is used instead.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

Tensor = torch.Tensor

_MIN_PARALLEL = 1 << 16
_POOL: Optional[ThreadPoolExecutor] = None


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers != workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="veil-noise")
    return _POOL


def gaussian_(buffer: Tensor, std: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fill the 1-D ``buffer`` with i.i.d. N(0, std²) in place and return it."""
    n = buffer.numel()
    workers = max(1, min(torch.get_num_threads(), n // _MIN_PARALLEL))
    seeds = torch.randint(0, 2**62, (workers,), generator=generator).tolist()
    if workers == 1 or buffer.device.type != "cpu":
        g = torch.Generator(device=buffer.device).manual_seed(seeds[0])
        return buffer.normal_(0.0, std, generator=g)
    slices = buffer.tensor_split(workers)

    def fill(i: int) -> None:
        slices[i].normal_(0.0, std, generator=torch.Generator().manual_seed(seeds[i]))

    list(_pool(workers).map(fill, range(workers)))
    return buffer


def noise_like(params: List[Tensor], std: float, generator: Optional[torch.Generator] = None,
               dtype: Optional[torch.dtype] = None, secure: bool = False) -> List[Tensor]:
    """One noise tensor per parameter (views of one flat buffer)."""
    if not params:
        return []
    device = params[0].device
    dtype = dtype or torch.promote_types(params[0].dtype, torch.float32)
    total = sum(p.numel() for p in params)
    if secure:
        from ..utils.secure_rng import secure_normal

        flat = secure_normal((total,), std, dtype=dtype, device=device)
    elif std == 0:
        flat = torch.zeros(total, dtype=dtype, device=device)
    else:
        flat = gaussian_(torch.empty(total, dtype=dtype, device=device), std, generator)
    out, i = [], 0
    for p in params:
        out.append(flat[i : i + p.numel()].view(p.shape))
        i += p.numel()
    return out
