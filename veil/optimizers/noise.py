"""Gaussian noise for the summed gradients, drawn fast and added in place.

torch draws normals on CPU with one thread per generator, so each block of noise is split into
slices, each filled in place by its own generator on its own thread.
The generators are seeded per step from the user's generator (or torch's default one), so a seeded
run is reproducible. In secure mode the OS's cryptographic generator is used instead.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

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


def add_gaussian_(flat: Tensor, std: float, generator: Optional[torch.Generator] = None,
                  secure: bool = False, block: int = 1 << 18) -> Tensor:
    """Add i.i.d. N(0, std²) to every element of the 1-D ``flat`` in place.

    The noise is drawn block by block into a scratch buffer of at most ``block`` elements, so a
    step needs no second parameter-sized buffer.
    """
    if std == 0 or flat.numel() == 0:
        return flat
    scratch = torch.empty(min(block, flat.numel()), dtype=flat.dtype, device=flat.device)
    for start in range(0, flat.numel(), block):
        part = flat[start : start + block]
        buf = scratch[: part.numel()]
        if secure:
            from ..utils.secure_rng import secure_normal

            buf.copy_(secure_normal((part.numel(),), 1.0, dtype=flat.dtype, device=flat.device))
        else:
            gaussian_(buf, 1.0, generator)
        part.add_(buf, alpha=std)
    return flat
