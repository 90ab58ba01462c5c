"""What the Python algorithms work with: a flat array cut into per-rank chunks, combined in place, scratch space.

An array is `comm._array(flat)`: a numpy view of a CPU tensor where the transport takes numpy (MPI), since slicing
and summing a numpy array costs a fraction of a microsecond, a tensor's a microsecond or more, and small
collectives are made of little else. Chunk c of a flat array of n elements over `size` ranks is
`chunks(n, size)[c]` (contract.split's rule), so any n works, including n < size.
"""

from __future__ import annotations

import numpy as np
import torch

from distrib.comm.contract import Array, split


def chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of each of `parts` nearly equal contiguous chunks of range(n)."""
    return [split(n, c, parts) for c in range(parts)]


def combine_(dst: Array, src: Array, op: str) -> None:
    """dst = dst (op) src, in place."""
    if isinstance(dst, np.ndarray):
        with np.errstate(all="ignore"):  # overflow to inf is silent, as in torch
            {"sum": np.add, "max": np.maximum, "min": np.minimum}[op](dst, src, out=dst)
    elif op == "sum":
        dst.add_(src)
    elif op == "max":
        torch.maximum(dst, src, out=dst)
    else:
        torch.minimum(dst, src, out=dst)


def empty(like: Array, n: int) -> Array:
    """An uninitialised 1-D array of n elements, of `like`'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return np.empty(n, like.dtype)
    return like.new_empty(n)


def views(flat: Array, parts: int) -> list[Array]:
    """The `chunks` of a flat array as views, made once per collective."""
    return [flat[start:stop] for start, stop in chunks(len(flat), parts)]


def segments(t: Array, seg: int) -> list[Array]:
    """`t` cut into pieces of at most `seg` elements: none when empty, `t` itself when it fits in one."""
    n = len(t)
    return [t] if 0 < n <= seg else [t[i : i + seg] for i in range(0, n, seg)]
