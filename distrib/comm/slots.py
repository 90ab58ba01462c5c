"""Slots: small files in memory-backed storage that the processes of one host map, each written by its owner only.

The owner's random nonce heads its slot, so a reader knows it mapped the right one (a folder seen under the same
name on another host holds another file, or none). The owner removes the file once every reader has mapped it:
the memory lives while mapped, and a job that dies leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import tempfile

# Memory-backed, and one per host; DISTRIB_FLIGHT_DIR chooses another (a test's second "host" on one machine).
FOLDER = os.environ.get("DISTRIB_FLIGHT_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


def make(path: str, size: int, nonce: int) -> mmap.mmap | None:
    """A new slot of `size` zero bytes at `path`, headed by `nonce`; None where the folder cannot take it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.ftruncate(fd, size)
        slot = mmap.mmap(fd, size)
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    slot[:8] = nonce.to_bytes(8, "little", signed=True)
    return slot


def attach(path: str, size: int, nonce: int) -> mmap.mmap | None:
    """Another process's slot, read-only, if it is on this host (its file is here and holds its nonce)."""
    if not nonce:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        slot = mmap.mmap(fd, size, prot=mmap.PROT_READ) if os.fstat(fd).st_size == size else None
    finally:
        os.close(fd)
    if slot is not None and int.from_bytes(slot[:8], "little", signed=True) != nonce:
        slot.close()
        return None
    return slot
