"""Memory accounting of queued messages, and giving freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["RECORD_OVERHEAD", "freeze_startup_objects", "limit_arenas", "malloc_trim", "records_bytes"]

#: Python memory of one message record besides its id and value: the 8-tuple and its
#: string and int objects (measured with tracemalloc: ~390-450 bytes for typical names)
RECORD_OVERHEAD: Final = 400


def records_bytes(records: Iterable[Any]) -> int:
    """Estimated memory of message records held as Python tuples."""
    n = 0
    size = 0
    for r in records:
        n += 1
        size += len(r[1]) + len(r[5])
    return size + n * RECORD_OVERHEAD


def _libc_function(name: str, *argtypes: Any) -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, name)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_TRIM = _libc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
_M_ARENA_MAX: Final = -8


def limit_arenas(n: int = 2) -> bool:
    """Let glibc use at most ``n`` malloc arenas in this process (``mallopt(M_ARENA_MAX)``).

    By default every thread that allocates may get an arena of its own (up to 8 per
    core), and the threads a peer runs work on (checkpoint encoding and uploads, fsyncs)
    leave tens of MiB in theirs that ``malloc_trim`` does not give back: measured on
    a 3-peer fan-out load, 231 MiB held when idle with the default, 73 MiB with one
    arena. Call it early, before those threads start. Returns whether it applied.
    """
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_ARENA_MAX, n))


def malloc_trim() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``).

    Python frees a burst's objects when they are processed, but glibc keeps the pages of
    its arenas for reuse, so a peer's RSS would stay at its peak after a load. Returns
    whether the call was available.
    """
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def freeze_startup_objects() -> int:
    """Collect once, then put every object alive now out of the cyclic collector's reach
    (``gc.freeze``); returns how many. For a peer process once it has started: its modules,
    functions and long-lived structures are most of its heap, and every collection of the
    oldest generation walked them all (~5 ms measured, 100 ms under contention) in the
    middle of whatever request was in progress; after this it walks what was made since.
    The frozen objects are never collected as cycles, so only call it on a heap that is
    meant to live as long as the process."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
