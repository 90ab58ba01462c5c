"""What every collective call agrees to: the reductions and dtypes there are, what the Python algorithms work on,
how a flat array is split between ranks, the deadline and how waits keep it, the errors raised when a call or a
peer breaks the agreement, and what a call is (its description and fingerprint, equal on ranks that agree)."""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Callable
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
    torch.complex64,  # reduced as pairs of floats (real): sum and avg only, as torch's
    torch.complex128,
)
Array = torch.Tensor | np.ndarray  # what the Python algorithms work on: a tensor, or a numpy view of a CPU one
DEFAULT_TIMEOUT = 300.0  # seconds; generous for big models on slow links, DISTRIB_TIMEOUT overrides
CHECK_EVERY = 32  # polls between looks at the clock
SPIN_SECONDS = 2e-4  # poll without sleeping this long: on a busy host one yield can cost a whole time slice
GRAB_SECONDS = 2e-5  # of that, poll holding the GIL this long: a small message's reply comes within it
NAP_SECONDS, MAX_NAP_SECONDS = 2e-5, 5e-4  # past SPIN_SECONDS, sleeps between polls, doubling: a late peer
TIGHT = range(32)  # polls in a bare loop first (about 3 us of MPI_Test)
SLOW_CHECK = 0.2  # seconds between a wait's costlier looks (is a peer dead, finished?)
MAX_TIMEOUT = 1e6  # seconds (11.6 days): a deadline must be one; torch's own turn 1e10 into garbage


class CollectiveError(RuntimeError):
    """A collective could not complete: tensors that differ across ranks, or a peer that failed.

    `culprits`: the ranks the flight recorder found at fault (empty when it could not tell); `stuck_pids`: the
    process ids, on this host, of those that are alive but stopped or stuck, which the job's end may take first.
    """

    def __init__(self, message: str, culprits: tuple[int, ...] = (), stuck_pids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.culprits, self.stuck_pids = culprits, stuck_pids


class CollectiveTimeout(CollectiveError):
    """A peer did not arrive before the deadline; the message names the collective and the ranks waited for."""


def check_timeout(value: Any, source: str) -> float:
    """`value` as seconds when it is a finite number in (0, MAX_TIMEOUT], else a one-line ValueError naming where
    it came from: `source` formats the value, as "DISTRIB_TIMEOUT={!r}" or "distrib.init(timeout={!r})". NaN, inf
    or 0 would switch the deadline off (a NaN passes `<= 0`, and `waited > nan` is never true)."""
    try:
        seconds = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT:  # also false for NaN
        raise ValueError(
            f"{source.format(value)} is not a deadline: give a finite number of seconds above 0 and at most "
            f"{MAX_TIMEOUT:g} (default {DEFAULT_TIMEOUT:g})"
        )
    return seconds


def env_timeout() -> float:
    """The collective timeout from DISTRIB_TIMEOUT (seconds), else the default."""
    value = os.environ.get("DISTRIB_TIMEOUT")
    return DEFAULT_TIMEOUT if value is None else check_timeout(value, "DISTRIB_TIMEOUT={!r}")


def poll(
    done: Callable[[], bool],
    timeout: float,
    crowded: bool,
    every: Callable[[], None] | None = None,
    pause: Callable[[], None] | None = None,
    sleeps: bool = True,
) -> bool:
    """Call `done` until it returns True (then True) or `timeout` seconds pass (then False).

    A wait gives way by stages, because the process's other threads (backward's hooks, while the engine thread
    waits here) need the GIL and the core: the first SPIN_SECONDS poll, pure spinning only for GRAB_SECONDS
    (peers on other cores answer within microseconds), then letting go of the GIL between polls; past that it
    sleeps between polls, or calls `pause` (which should sleep until something may have changed), from
    NAP_SECONDS doubling up to MAX_NAP_SECONDS. Where ranks outnumber cores (the peer may need this core), each
    poll yields the core, or calls `pause` from the start. `sleeps=False` where `done` itself makes the progress
    (MPI's Test): a sleeping poll would hold the collective up, so it only ever gives way. `every`, if given, runs
    about every SLOW_CHECK seconds of waiting, for looks too costly for each poll (it may raise to end the wait).
    """
    for _ in TIGHT:  # a small message's reply: within microseconds, caught by the tightest loop
        if done():
            return True
    start, spins, slow, nap = time.monotonic(), 0, SLOW_CHECK, NAP_SECONDS
    give = os.sched_yield if crowded else _let_go
    waited = 0.0
    while not done():
        spins += 1
        if spins % CHECK_EVERY == 0:
            waited = time.monotonic() - start
            if waited > timeout:
                return False
            if every is not None and waited > slow:
                slow = waited + SLOW_CHECK
                every()
        if pause is not None and (crowded or waited > SPIN_SECONDS):
            pause()
        elif waited > SPIN_SECONDS and sleeps:
            time.sleep(nap)
            nap = min(2 * nap, MAX_NAP_SECONDS)
        elif crowded or waited > GRAB_SECONDS:
            give()
    return True


def _let_go() -> None:
    """Release the GIL for a moment, so that a thread waiting for it can take it (a pure-Python spin would hold
    it for the whole switch interval, 5 ms)."""
    time.sleep(0)


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
    if t.layout != torch.strided:
        raise TypeError(f"collectives take dense tensors (allreduce sparse ones too), got {t.layout}; call .to_dense()")
    if t.dtype not in DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise TypeError(f"dtype {t.dtype} is not supported; use one of {names}")
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    if op == "avg" and not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"op='avg' needs a floating-point tensor, got {t.dtype}; use op='sum' and divide")
    if op in ("max", "min") and t.is_complex():
        raise ValueError(f"op={op!r} has no meaning on {t.dtype} (complex numbers have no order); use 'sum' or 'avg'")


def real(flat: torch.Tensor) -> torch.Tensor:
    """A flat tensor as the algorithms move it: a complex one as its real and imaginary parts, the same memory."""
    return torch.view_as_real(flat).view(-1) if flat.is_complex() else flat


def describe(name: str, t: Any, op: str, algorithm: str, label: Any) -> tuple[str, str]:
    """(what a call is, as ranks must agree on it; its label, which they need not agree on)."""
    signature = name
    if t is not None:
        dtype = str(t.dtype).removeprefix("torch.")
        signature = f"{name}(op={op!r}, algorithm={algorithm!r}) on {dtype} {tuple(t.shape)}"
    return signature, ", ".join(f"{k} {v}" for k, v in label.items()) if label else ""


def fingerprint(signature: str) -> int:
    """A 31-bit CRC of what a call is: equal on every rank that makes the same call."""
    return zlib.crc32(signature.encode()) & 0x7FFFFFFF


def check_root(root: Any, size: int, what: str) -> None:
    """A root that is a rank of the world, else a ValueError on every rank (root is the same on all of them)."""
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < size:
        raise ValueError(f"{what} root {root!r} is not a rank of a world of size {size}")


def check_usable(comm: Any) -> None:
    """Raise if `comm` timed out or was closed: no call of any kind may be made on it then."""
    if comm._unusable is not None:
        raise CollectiveError(comm._unusable)


def check_peer(comm: Any, t: torch.Tensor, peer: Any, what: str) -> torch.Tensor:
    """`t`, once `comm` may still be used, `peer` is another rank and `t` is contiguous (a transport takes its memory
    as it lies: a strided view would send, or receive into, the wrong elements)."""
    check_usable(comm)
    if comm.size == 1:
        raise ValueError("a world of one rank has no peers to send to or receive from")
    if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < comm.size or peer == comm.rank:
        raise ValueError(f"{what}: peer {peer!r} is not another rank of a world of {comm.size} (this is {comm.rank})")
    if not t.is_contiguous():
        raise ValueError(f"{what} needs a contiguous tensor, as torch's: pass t.contiguous(), copy a received one back")
    return t
