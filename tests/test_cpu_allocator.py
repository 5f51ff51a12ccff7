import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")

# While an 8 MiB tensor is alive: is its block mmapped (returned to the kernel on free, faulted in
# afresh next time) or in the heap (reused)? glibc's mallinfo2 tells: hblkhd = bytes in mmapped blocks.
PROBE = """
import ctypes, torch
from veil.utils.cpu_allocator import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
    print("skip skip")
    raise SystemExit
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory()
before = libc.mallinfo2().hblkhd
t = torch.ones(2 << 20)
print(applied, libc.mallinfo2().hblkhd - before >= t.numel() * 4)
"""


def _probe(env_value: str):
    env = dict(os.environ, VEIL_TUNE_MALLOC=env_value)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    applied, mmapped = out.split()
    if applied == "skip":
        pytest.skip("glibc without mallinfo2 (older than 2.33)")
    return applied == "True", mmapped == "True"


def test_large_blocks_come_from_the_heap():
    assert _probe("1") == (True, False)


def test_opt_out_keeps_glibc_defaults():
    assert _probe("0") == (False, True)  # glibc's default: an 8 MiB block is mmapped
