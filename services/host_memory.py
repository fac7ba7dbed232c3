"""Give freed host memory back to the operating system after a request's large temporaries are gone.

A CPU prefill allocates and frees tensors of tens of MiB (attention scores, MLP activations).
glibc raises its mmap threshold after such frees, so later ones come from its heap arenas, and
memory freed there stays in the process: a server's resident set then grows with the number of
requests it has seen, not with what it holds. `malloc_trim(0)` returns the free pages; it is a
no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Callable


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True when glibc's malloc_trim ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
