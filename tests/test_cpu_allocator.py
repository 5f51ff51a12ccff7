import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")

PROBE = """
import resource, sys, torch
from veil.utils.cpu_allocator import retain_freed_memory
applied = retain_freed_memory()
torch.ones(2 << 20).sum()  # 8 MiB, freed: from now on such blocks can come from the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(2 << 20).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_value: str):
    import os

    env = dict(os.environ, VEIL_TUNE_MALLOC=env_value)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = _probe("1")
    assert applied
    # 20 allocations of 8 MiB are 40,960 pages; kept in the heap they fault in at most once or twice
    assert faults <= 4096, faults


def test_opt_out_keeps_glibc_defaults():
    applied, _ = _probe("0")
    assert not applied
