"""Files that are whole or absent: atomic torch.save with a sha256, and reads that check it before loading.

A write goes to a temporary name, is flushed and fsynced, renamed, and the directory fsynced, so a crash
leaves the old file or the new one, never half of one. A read refuses a file whose size or checksum differs
from the record, and loads with weights_only=True: tensors and plain data, never code.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

Record = dict[str, Any]  # {"bytes": size, "sha256": hex digest}


class DamagedFile(ValueError):
    """A file that is missing, truncated, altered, or not plain tensors and data."""


def write(path: Path, obj: Any) -> Record:
    """torch.save `obj` to `path` atomically; returns its size and sha256. A failed write raises the OSError
    behind it (ENOSPC: "No space left on device") and leaves no temporary file taking up the space."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            hashing = _Hashing(f)
            try:
                torch.save(obj, hashing)
            except RuntimeError:
                # torch's zip writer turns a failed write into "[enforce fail at inline_container.cc] unexpected
                # pos"; the file's own error says what happened.
                if hashing.error is not None:
                    raise hashing.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {"bytes": hashing.bytes, "sha256": hashing.sha.hexdigest()}


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read(path: Path, record: Record) -> Any:
    """The object saved in `path`, once its size and sha256 match `record`; on the CPU."""
    data = path.read_bytes()
    problem = _compare(path, record, len(data), lambda: hashlib.sha256(data).hexdigest())
    if problem:
        raise DamagedFile(problem)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses code; anything else unreadable is as bad
        raise DamagedFile(f"{path.name} does not load as plain tensors and data ({type(error).__name__})") from None


def check(path: Path, record: Record) -> str | None:
    """What is wrong with `path` against `record` (missing, truncated, altered), or None; reads it in blocks."""
    if not path.is_file():
        return f"{path.name} is missing"
    return _compare(path, record, path.stat().st_size, lambda: _sha256(path))


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Hashing:
    """A file that hashes what is written through it, so the checksum costs no second read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0
        self.error: OSError | None = None  # the first failed write, which torch's writer hides

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.f.flush()


def _compare(path: Path, record: Record, size: int, sha256) -> str | None:
    if size != record["bytes"]:
        return f"{path.name} is truncated or overwritten ({size} bytes, the manifest says {record['bytes']})"
    if sha256() != record["sha256"]:
        return f"{path.name} is corrupted (its sha256 differs from the manifest's)"
    return None


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
