"""The offloaded step in tiles: gradients down to the host, Adam on the CPU, parameters back up, overlapped.

The ZeRO-Offload paper's and DeepSpeed CPUAdam's schedule. The shard is cut into tiles; while the CPU steps tile k,
a side CUDA stream copies tile k+1's gradient down and tile k's updated parameters up, so only the first tile's
download and the last tile's upload are not hidden behind the CPU's work. The copies run between the GPU and pinned
host memory, in the parameters' dtype (bf16 moves 2 bytes an element, not 4). With the parameters on the CPU the
same schedule runs with inline copies, so a CPU run exercises every line of it but the stream's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from distrib import tracing

TILE_NUMEL = 1 << 23  # 8M elements a tile: 16-32 MB, copied in about a millisecond, stepped on the CPU in several
# Tiles are whole multiples of this many elements, cut from each param group's start: the fused CPU Adam then
# meets the same SIMD vectors and tails as on the whole shard, so tiling changes no bit of the result.
ALIGN = 64


def check_tile(tile: int | None) -> None:
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or tile % ALIGN):
        raise ValueError(
            f"tile_numel must be a positive multiple of {ALIGN} elements, or None for one tile; got {tile!r}"
        )


def spans(numel: int, tile: int | None, starts: Sequence[int] = ()) -> list[slice]:
    """[0, numel) cut into tiles, in order: at each of `starts` (where param groups begin), then every `tile`
    elements after each cut; one tile when `tile` is None."""
    check_tile(tile)
    if tile is None:
        return [slice(0, numel)] if numel else []
    cuts = [*sorted({0, *(s for s in starts if 0 < s < numel)}), numel]
    return [slice(a, min(a + tile, hi)) for lo, hi in zip(cuts, cuts[1:]) for a in range(lo, hi, tile)]


def pipeline(
    tiles: Sequence[slice],
    fetch: Callable[[slice], Any],
    wait: Callable[[Any], None],
    update: Callable[[slice], None],
    store: Callable[[slice], None],
) -> None:
    """Each tile fetched, waited for, updated and stored, in order; tile k+1's fetch is issued before tile k's update.

    fetch(tile) starts the tile's download and returns what wait() blocks on until it has landed; store(tile) starts
    its upload. On a stream both run while the host updates the next tile.
    """
    pending = fetch(tiles[0]) if tiles else None
    for k, tile in enumerate(tiles):
        following = fetch(tiles[k + 1]) if k + 1 < len(tiles) else None
        wait(pending)
        update(tile)
        store(tile)
        pending = following


class Copies:
    """Copies on a side CUDA stream, each ending in an event; inline copies (no stream, no events) on the CPU.

    While a trace records, each copy is a span: on the GPU on the stream's own track, timed by CUDA events.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.track = f"{device} copy stream"
        self._timed: list[tuple[str, int, Any, Any]] = []  # (name, tile, start event, end event) to trace
        self._origin: tuple[Any, int] | None = None  # an event and the host's clock when it completed

    def begin(self) -> None:
        """The copies follow the work queued on the compute stream so far (the gradients' reduce-scatter)."""
        if self.stream is None:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        if tracing.recorder() is not None:  # a common origin for event times and the host's clock
            origin = torch.cuda.Event(enable_timing=True)
            origin.record(self.stream)
            origin.synchronize()
            self._origin = (origin, time.perf_counter_ns())

    def copy(self, dst: Tensor, src: Tensor, name: str, tile: int) -> Any:
        """dst.copy_(src): queued on the stream (returns its event), or done now on the CPU (returns None)."""
        if self.stream is None:
            with tracing.span(name, "copy", tile=tile, bytes=dst.numel() * dst.element_size()):
                dst.copy_(src)
            return None
        timed = self._origin is not None
        start = torch.cuda.Event(enable_timing=timed)
        end = torch.cuda.Event(enable_timing=timed)
        with torch.cuda.stream(self.stream):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
        if timed:
            self._timed.append((name, tile, start, end))
        return end

    def wait(self, event: Any) -> None:
        """Block the host until the copy that recorded `event` has landed."""
        if event is not None:
            event.synchronize()

    def end(self) -> None:
        """Wait for every queued copy, so the host buffers may be written and the device reads the uploads."""
        if self.stream is None:
            return
        self.stream.synchronize()
        recorder = tracing.recorder()
        if self._origin is not None and recorder is not None:
            origin, host_ns = self._origin
            for name, tile, start, end in self._timed:
                begin_ns = host_ns + int(origin.elapsed_time(start) * 1e6)
                end_ns = host_ns + int(origin.elapsed_time(end) * 1e6)
                recorder.add(name, "copy", begin_ns, end_ns, track=self.track, tile=tile)
        self._timed, self._origin = [], None


class Offload:
    """The host side of one rank's shard: its gradient in fp32, and pinned staging in the parameters' dtype.

    `own` is the shard of the parameters on their device; `starts`, where its param groups begin. `grad` (fp32,
    pinned when `own` is on a GPU) receives the reduced gradient; the fp32 master the CPU updates is the caller's
    (pinned too: it is an upload's source).
    """

    def __init__(self, own: Tensor, tile_numel: int | None = TILE_NUMEL, starts: Sequence[int] = ()) -> None:
        self.own, self.tiles, self.copies = own, spans(own.numel(), tile_numel, starts), Copies(own.device)
        self._number = {tile.start: k for k, tile in enumerate(self.tiles)}  # a tile's index, for the trace
        host = partial(torch.zeros, own.numel(), pin_memory=own.is_cuda)
        self.grad = host(dtype=torch.float32)
        narrow = own.is_cuda and own.dtype != torch.float32  # copy 2-byte elements; widen and narrow on the CPU
        self._grad_low = host(dtype=own.dtype) if narrow else None
        self._param_low = host(dtype=own.dtype) if narrow else None

    def nbytes(self) -> int:
        """Bytes of the host buffers: the fp32 gradient, and the staging where the parameters are not fp32."""
        buffers = (self.grad, self._grad_low, self._param_low)
        return sum(t.numel() * t.element_size() for t in buffers if t is not None)

    def step(self, grad: Tensor, master: Tensor, update: Callable[[slice], None]) -> None:
        """Tile by tile: `grad` (the device's reduced shard) down into self.grad, update(tile) on the CPU (the Adam
        step of `master` there), `master` up into the parameters, the copies overlapping the updates."""
        self.copies.begin()
        fetch = partial(self._down, grad)

        def widen_then_update(tile: slice) -> None:
            if self._grad_low is not None:
                self.grad[tile].copy_(self._grad_low[tile])
            update(tile)

        pipeline(self.tiles, fetch, self.copies.wait, widen_then_update, partial(self._up, master))
        self.copies.end()

    def download(self, grad: Tensor) -> None:
        """The whole reduced gradient into self.grad, for a delayed step (delay_update) to take later."""
        self.copies.begin()
        for tile in self.tiles:
            self._down(grad, tile)
        self.copies.end()
        if self._grad_low is not None:
            self.grad.copy_(self._grad_low)

    def upload(self, master: Tensor) -> None:
        """The whole master into the parameters' shard, in their dtype (tile k narrows while tile k-1 moves)."""
        self.copies.begin()
        for tile in self.tiles:
            self._up(master, tile)
        self.copies.end()

    def _down(self, grad: Tensor, tile: slice) -> Any:
        into = self._grad_low if self._grad_low is not None else self.grad
        return self.copies.copy(into[tile], grad[tile], "gradient to host", self._index(tile))

    def _up(self, master: Tensor, tile: slice) -> None:
        source = master
        if self._param_low is not None:  # round to the parameters' dtype here (nearest even), then move 2 bytes
            source = self._param_low
            source[tile].copy_(master[tile])
        self.copies.copy(self.own[tile], source[tile], "parameters to device", self._index(tile))

    def _index(self, tile: slice) -> int:
        return self._number[tile.start]
