"""Freed memory handed back to the operating system between a run's phases.

glibc keeps what a phase frees (the backbone's conversion, the training steps' activations) in its heaps, one per
thread that allocated (torch's intra-op threads make several), and reuses it only for allocations that fit its free
chunks, so the process keeps the training's peak through the evaluation that follows (measured on the smoke run:
bench/README.md). ``malloc_trim`` returns every heap's whole free pages. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Collects Python's garbage and returns the C heap's free pages to the OS (glibc ``malloc_trim(0)``)."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
