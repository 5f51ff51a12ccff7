"""veil.utils.native: building, caching and falling back."""
import shutil

import pytest

from veil.utils import native

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@needs_cc
def test_builds_into_the_cache_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path))
    assert native.build("gaussian") is not None
    built = list((tmp_path / "native").glob("gaussian-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native.build("gaussian") is not None
    assert built[0].stat().st_mtime_ns == stamp, "a cached library is not rebuilt"


@needs_cc
def test_a_corrupt_cached_library_is_rebuilt(tmp_path, monkeypatch):
    """(Never loaded before under this path: the dynamic loader would hand back the loaded copy.)"""
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path))
    path = native.target("lstm_cell")
    path.write_bytes(b"not a shared object")
    lib = native.build("lstm_cell")
    assert lib is not None and hasattr(lib, "lstm_fwd_step")
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_no_compiler_or_disabled_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.build("gaussian") is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("VEIL_NATIVE", "0")
    assert native.build("gaussian") is None
    assert native.build("no_such_kernel") is None


def test_set_enabled_bypasses_a_library():
    native.set_enabled("gaussian", False)
    try:
        assert native.library("gaussian") is None
    finally:
        native.set_enabled("gaussian", True)
