"""Keep freed CPU memory in the process heap, so per-step temporaries do not page-fault.

glibc's malloc serves blocks above its mmap threshold (128 KiB, raised dynamically) with fresh
pages from the kernel and gives them back on free; every step then pays a page fault per 4 KiB of
each large temporary. On the 2-core VM Veil is benchmarked on, an 8 MiB per-sample gradient took
8.5 ms to produce with the default settings and 2.1 ms with the threshold at 32 MiB, and plain
PyTorch steps were unchanged. Veil therefore raises the thresholds once, when the first
GradSampleModule is built; set the environment variable ``VEIL_TUNE_MALLOC=0`` to keep glibc's
defaults. Memory freed below the threshold stays mapped to the process: its resident size stays at
its peak instead of shrinking between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied = False


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process). Returns True when they are set:
    on Linux with glibc and unless ``VEIL_TUNE_MALLOC=0``; elsewhere it does nothing."""
    global _applied
    if _applied:
        return True
    if os.environ.get("VEIL_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
