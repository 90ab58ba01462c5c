"""Slots: files in memory-backed storage that the processes of one host map, each written by its owner only (the
flight recorder's; the regions of regions.py are written by their peers too).

The owner's random nonce heads its slot, so a reader knows it mapped the right one (a folder seen under the same
name on another host holds another file, or none). The owner removes the file once every reader has mapped it:
the memory lives while mapped, and a job that dies leaves nothing behind. A reader may sleep until a word of a
slot changes (Linux futexes: the writer wakes it), rather than spin on a core another thread needs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from typing import Any

import numpy as np

# Memory-backed, and one per host; DISTRIB_FLIGHT_DIR chooses another (a test's second "host" on one machine).
FOLDER = os.environ.get("DISTRIB_FLIGHT_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
Shared = tuple[list[mmap.mmap | None], list[list[bool]]]  # share(): the slots as this rank maps them; who maps whom


def make(path: str, size: int, nonce: int) -> mmap.mmap | None:
    """A new slot of `size` zero bytes at `path`, headed by `nonce`; None where the folder cannot take it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)  # the pages now, or ENOSPC now: a full tmpfs would SIGBUS at first touch
        slot = mmap.mmap(fd, size)
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    slot[:8] = nonce.to_bytes(8, "little", signed=True)
    return slot


def attach(path: str, size: int, nonce: int, writable: bool = False) -> mmap.mmap | None:
    """Another process's slot, read-only unless `writable`, if it is on this host (its file is here and holds its
    nonce)."""
    if not nonce:
        return None
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError:
        return None
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        slot = mmap.mmap(fd, size, prot=prot) if os.fstat(fd).st_size == size else None
    finally:
        os.close(fd)
    if slot is not None and int.from_bytes(slot[:8], "little", signed=True) != nonce:
        slot.close()
        return None
    return slot


def share(comm: Any, name: str, size: int, nonce: int, mine: mmap.mmap | None, writable: bool = False) -> Shared:
    """Collective over `comm`: every rank's slot `name` (made with `make`, or None) as this rank can map it, each
    looked for in this host's folder, and for each rank which slots it mapped. This rank's file is removed once
    every rank has looked."""
    places = comm.allgather_object((name, nonce if mine is not None else 0))
    maps = [mine if r == comm.rank else attach(os.path.join(FOLDER, n), size, k, writable)
            for r, (n, k) in enumerate(places)]  # fmt: skip
    seen = comm.allgather_object([m is not None for m in maps])
    if mine is not None:
        os.unlink(os.path.join(FOLDER, name))
    return maps, seen


_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)  # the futex syscall's number, where we know it
_WAIT, _WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True) if _FUTEX else None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def address(slot: mmap.mmap) -> int:
    """Where `slot` starts in this process's memory (valid while it is mapped)."""
    return np.frombuffer(slot, dtype=np.uint8).ctypes.data


def sleep_while(addr: int, value: int, seconds: float) -> None:
    """Sleep until the 32-bit word at `addr` is woken, or no longer holds `value`, or `seconds` pass."""
    if _libc is None:
        os.sched_yield()
        return
    limit = _Timespec(0, int(seconds * 1e9))
    _libc.syscall(_FUTEX, ctypes.c_void_p(addr), _WAIT, ctypes.c_uint32(value), ctypes.byref(limit), None, 0)


def wake(addr: int) -> None:
    """Wake every process sleeping on the word at `addr`."""
    if _libc is not None:
        _libc.syscall(_FUTEX, ctypes.c_void_p(addr), _WAKE, 0x7FFFFFFF, None, None, 0)
