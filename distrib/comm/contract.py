"""What every collective call agrees to: the reductions and dtypes there are, what the Python algorithms work on,
how a flat array is split between ranks, the default deadline, and the errors raised when a call or a peer breaks
the agreement."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

OPS = ("sum", "avg", "max", "min")
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.int8,
    torch.uint8,
)
Array = torch.Tensor | np.ndarray  # what the Python algorithms work on: a tensor, or a numpy view of a CPU one
DEFAULT_TIMEOUT = 300.0  # seconds; generous for big models on slow links, DISTRIB_TIMEOUT overrides


class CollectiveError(RuntimeError):
    """A collective could not complete: tensors that differ across ranks, or a peer that failed."""


class CollectiveTimeout(CollectiveError):
    """A peer did not arrive before the deadline; the message names the collective and the ranks waited for."""


def env_timeout() -> float:
    """The collective timeout from DISTRIB_TIMEOUT (seconds), else the default."""
    value = os.environ.get("DISTRIB_TIMEOUT")
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"DISTRIB_TIMEOUT={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"DISTRIB_TIMEOUT={value!r} must be positive")
    return seconds


def split(n: int, rank: int, parts: int) -> tuple[int, int]:
    """[start, stop) of part `rank` of range(n) cut into `parts` contiguous parts, the first n % parts of them one
    longer (numpy.array_split's rule): how ranks share a flat array, and a global batch."""
    base, extra = divmod(n, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def check_tensor(t: Any, op: str) -> None:
    """Raise a clear error unless `t` is a tensor of a supported dtype and `op` a supported reduction of it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"collectives take a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise TypeError(f"dtype {t.dtype} is not supported; use one of {names}")
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    if op == "avg" and not t.is_floating_point():
        raise ValueError(f"op='avg' needs a floating-point tensor, got {t.dtype}; use op='sum' and divide")
