"""Host memory a process frees, kept for its next tensors instead of handed back to the kernel (glibc's malloc).

glibc gives each large block (above a threshold it adapts, at most 32 MiB) a mapping of its own and unmaps it at
free, and hands the top of its heap back once it grows idle; a training step frees its gradients and activations
and allocates them again the next step, so every step writes to fresh pages, each 4 KiB a page fault in which the
kernel zeroes it (on a VM, often a trip to the hypervisor too), thousands more or fewer from one step to the next
with where glibc happened to place each block. Raised thresholds keep the blocks in the heap for the next step:
the process holds on to its peak, as torch's CUDA caching allocator does on a GPU. `distrib.init()` does this
unless DISTRIB_KEEP_MEMORY=0 (the README's benchmarks say what it saves).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_BELOW = 1 << 30  # blocks up to 1 GiB come from the heap (glibc's own ceiling for the adaptive one: 32 MiB)
TRIM_ABOVE = (1 << 31) - 1  # the largest an int holds: the heap's idle top stays the process's


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether DISTRIB_KEEP_MEMORY asks for it: 1 (the default) or 0; any other value is an error."""
    value = (os.environ if env is None else env).get("DISTRIB_KEEP_MEMORY", "1")
    if value not in ("0", "1"):
        raise ValueError(f"DISTRIB_KEEP_MEMORY={value!r} is not a switch: 1 (the default) or 0 (malloc's own policy)")
    return value == "1"


def keep_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """Have malloc keep freed blocks for reuse, if `wanted`; True if it took both settings (False under another C
    library, which has no mallopt or ignores it)."""
    if not wanted(env):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
