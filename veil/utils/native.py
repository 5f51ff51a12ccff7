"""Veil's small C kernels (``veil/csrc/*.c``), compiled on first use and loaded with ctypes.

Two hot loops are cheaper in C than as sequences of torch ops:

* ``lstm_cell``: the pointwise work of one LSTM time step, forward and backward. Issued from Python
  as torch ops, a step's ~10 small pointwise ops cost more than its matrix product at small batch
  sizes (~60 us against ~31 us for a 64x128 by 128x512 product on the 2-core CPU Veil is
  benchmarked on); the C step takes ~12 us.
* ``gaussian``: the DP noise, Philox4x32-10 random bits and the Box-Muller transform, ~3x faster
  than ``Tensor.normal_`` on one thread (142,610 normals: 0.12 ms against 0.34 ms).

A source is compiled with the system C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$VEIL_CACHE/native`` (default ``~/.cache/veil/native``, else the temporary directory), under a
name derived from the source, the flags and the CPU's feature flags, so a shared cache never hands
a machine a library built for another CPU. Without a compiler, off Linux, or with
``VEIL_NATIVE=0``, :func:`library` returns None and callers use torch ops (tested both ways).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

SOURCES = Path(__file__).resolve().parent.parent / "csrc"
# -fno-trapping-math and -fno-math-errno let the compiler vectorise float-to-int conversions and sqrt;
# no -ffast-math, so NaN and inf propagate as IEEE arithmetic says (a NaN gradient stays NaN and is
# refused at step time)
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared"]

_libs: Dict[str, Optional[ctypes.CDLL]] = {}
_disabled: set = set()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("VEIL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "veil"
    for d in (base / "native", Path(tempfile.gettempdir()) / "veil-native"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable cache directory")


def target(name: str) -> Optional[Path]:
    """Where the library ``name`` is (or will be) cached, or None where it cannot be built."""
    if os.environ.get("VEIL_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    cc = _compiler()
    source = SOURCES / f"{name}.c"
    if cc is None or not source.exists():
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join([cc] + FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    try:
        return _cache_dir() / f"{name}-{key}.so"
    except OSError:
        return None


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(name: str) -> Optional[ctypes.CDLL]:
    """Compile (or find in the cache) and load ``veil/csrc/<name>.c``; None where that is not possible."""
    path = target(name)
    if path is None:
        return None
    cc, source = _compiler(), SOURCES / f"{name}.c"
    for attempt in range(2):  # a cached file that does not load (e.g. truncated by a crash) is rebuilt once
        try:
            if not path.exists():
                _compile(cc, source, path)
            return ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError):
            if attempt == 0 and path.exists():
                try:
                    path.unlink()
                except OSError:
                    return None
                continue
            return None
    return None


def _compile(cc: str, source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(source)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent first uses never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library(name: str, declare: Optional[Callable[[ctypes.CDLL], None]] = None) -> Optional[ctypes.CDLL]:
    """The loaded library ``name`` (built once per process; ``declare`` sets its functions' argtypes on
    first load), or None where it is unavailable or disabled."""
    if name in _disabled:
        return None
    if name not in _libs:
        lib = build(name)
        if lib is not None and declare is not None:
            declare(lib)
        _libs[name] = lib
    return _libs[name]


def set_enabled(name: str, enabled: bool) -> None:
    """Use (True) or bypass (False) the C kernel ``name`` from now on, e.g. to compare the two paths."""
    if enabled:
        _disabled.discard(name)
    else:
        _disabled.add(name)
