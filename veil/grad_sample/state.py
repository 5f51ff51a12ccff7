"""Process-wide switches of the per-sample engine."""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

_local = threading.local()

#: How many recent products shared_product keeps.
_KEEP_PRODUCTS = 3


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


@contextlib.contextmanager
def shared_products():
    """While the engine turns one backward pass into norms, products of the same tensor (e.g. the
    Gram matrix of an output gradient that two layers share, as a recurrent layer's input and
    hidden projections do) are computed once. Layers that share a tensor are handled one after the
    other, so only the last few products are kept (a transformer block's Gram matrices at T=64
    would otherwise hold 10 MiB until the backward's end)."""
    prev = getattr(_local, "products", None)
    _local.products = OrderedDict()
    try:
        yield
    finally:
        _local.products = prev


def shared_product(name: str, t, compute):
    """``compute(t)``, reused for the same tensor contents within :func:`shared_products`."""
    cache = getattr(_local, "products", None)
    if cache is None:
        return compute(t)
    key = (name, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version)
    if key in cache:
        cache.move_to_end(key)
    else:  # the entry keeps t alive, so no other tensor can reuse its memory meanwhile
        cache[key] = (t, compute(t))
        while len(cache) > _KEEP_PRODUCTS:
            cache.popitem(last=False)
    return cache[key][1]
