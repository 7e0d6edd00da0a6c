"""Keeping the memory a step frees for the next one: glibc's defaults map every large tensor afresh and fault it in
again, which on CPU costs a third of a small SAE step (`freed_memory_kept`, used by `Trainer.fit` and the
initializer's grid search)."""

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

_kept = {"depth": 0, "lock": threading.Lock()}


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Keep the memory one step frees for the next (glibc): by default every allocation past 32 MiB is mapped
    afresh and freed memory goes back to the system, so each step faults the same large tensors in again (on CPU a
    third of a quickstart SAE step). Afterwards (the last of concurrent fits) the kept memory is returned and glibc
    is left at the ceiling of its own adaptive settings: mapped past 32 MiB, trimmed past 64 MiB."""
    libc = _glibc()
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    with _kept["lock"]:
        _kept["depth"] += 1
        if libc is not None and _kept["depth"] == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _kept["lock"]:
            _kept["depth"] -= 1
            if libc is not None and _kept["depth"] == 0:
                libc.mallopt(M_MMAP_MAX, 65536)
                libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
                libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
                libc.malloc_trim(0)


def _glibc():
    """The C library when it is glibc (whose `mallopt` settings `freed_memory_kept` knows), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
