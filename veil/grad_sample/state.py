"""Process-wide switches of the per-sample engine."""
from __future__ import annotations

import contextlib
import threading

_local = threading.local()


def is_replaying() -> bool:
    """True while a rule replays a module's forward (its hooks must then stay silent)."""
    return getattr(_local, "replaying", False)


@contextlib.contextmanager
def replaying():
    prev = is_replaying()
    _local.replaying = True
    try:
        yield
    finally:
        _local.replaying = prev
