"""DistributedDataParallel: torch's constructor and behaviour, over a distrib Communicator.

Hooks only: a post-accumulate-grad hook per parameter tells the Reducer (buckets.py) that a gradient is
ready, and a callback queued on autograd's engine waits for the buckets at the end of backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from distrib.comm import Communicator
from distrib.ddp.buckets import FIRST_BUCKET_BYTES, MIB, Reducer
from distrib.process import init

DEFAULT_BUCKET_CAP_MB = 25  # torch's default
_SPARSE = (nn.Embedding, nn.EmbeddingBag)  # the modules whose gradients can be sparse


class DistributedDataParallel(nn.Module):
    """Wraps `module` so that backward averages its gradients over all ranks; a drop-in for torch's DDP.

    Arguments as torch's, plus `comm` (a Communicator; None: `distrib.init()`) and `algorithm` (one of
    distrib.ALGORITHMS; None: the communicator's default). `process_group` may be a Communicator too. Accepted and
    ignored:
    `dim` (torch scatters inputs along it only in its retired one-process-many-GPUs mode), `output_device` (as in
    torch with one device per process, outputs stay where the module puts them) and `check_reduction` (a no-op in
    torch too). `static_graph=True` allows unused parameters like `find_unused_parameters=True`; buckets are
    never rebuilt here, so it has nothing else to do. A parameter that gets no gradient on some rank without
    them is an error raised on every rank at the end of backward (the buckets carry who used what), never a hang.
    """

    def __init__(
        self,
        module: nn.Module,
        device_ids: Sequence[int | torch.device] | None = None,
        output_device: int | torch.device | None = None,
        dim: int = 0,
        broadcast_buffers: bool = True,
        init_sync: bool = True,
        process_group: Communicator | None = None,
        bucket_cap_mb: float | None = None,
        find_unused_parameters: bool = False,
        check_reduction: bool = False,
        gradient_as_bucket_view: bool = False,
        static_graph: bool = False,
        *,
        comm: Communicator | None = None,
        algorithm: str | None = None,
    ) -> None:
        super().__init__()
        self.comm = _communicator(comm, process_group)
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{type(module).__name__} has no parameter that requires a gradient; there is nothing for "
                "DistributedDataParallel to average (leave the module unwrapped)"
            )
        sparse = [name for name, m in module.named_modules() if isinstance(m, _SPARSE) and m.sparse]
        if sparse:
            raise ValueError(
                f"{sparse[0]!r} makes sparse gradients, which the flat buckets cannot hold; use sparse=False"
            )
        if bucket_cap_mb is not None and not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a positive number of MiB, got {bucket_cap_mb}")
        algorithm = self.comm.check_algorithm(algorithm or self.comm.algorithm)
        self.module = module
        self.device = _input_device(device_ids, output_device, [p for _, p in named])
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.require_backward_grad_sync = True  # False inside no_sync()
        self.require_forward_param_sync = True  # torch's name: sync buffers before the next forward

        _check_same_model(self.comm, module)
        if init_sync:
            states = [p for p in module.parameters()] + (list(module.buffers()) if broadcast_buffers else [])
            _broadcast_(self.comm, states)

        cap = int((DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else bucket_cap_mb) * MIB)
        self._names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.reducer = Reducer(
            self.comm,
            self._params,
            cap_bytes=cap,
            first_cap_bytes=FIRST_BUCKET_BYTES if bucket_cap_mb is None else cap,  # torch: only with the default cap
            algorithm=algorithm,
            grad_as_view=gradient_as_bucket_view,
        )
        self._expect_grads = False  # set by a forward that needs its backward synchronised
        self._callback_queued, self._task = False, -1
        self._used_since_sync: set[int] = set()  # gradients accumulated in no_sync() steps count as produced
        # The hooks hold the wrapper weakly: a parameter's hooks live in C++, where the garbage collector cannot
        # see a cycle back to the wrapper, which would then never be freed (nor its buckets).
        handles = [
            p.register_post_accumulate_grad_hook(partial(_hook, weakref.ref(self), i))
            for i, p in enumerate(self._params)
        ]
        weakref.finalize(self, _remove, handles)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.device is not None:
            inputs, kwargs = _to(inputs, self.device), _to(kwargs, self.device)
        if self.require_forward_param_sync and self.broadcast_buffers:
            _broadcast_(self.comm, list(self.module.buffers()))
        output = self.module(*inputs, **kwargs)
        # As in torch: whether this forward's backward synchronises (and the next forward syncs buffers) is
        # decided here, so the forward must be inside no_sync() too.
        self._expect_grads = torch.is_grad_enabled() and self.require_backward_grad_sync
        self.require_forward_param_sync = self._expect_grads
        return output

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward-backward passes inside accumulate gradients locally; the first one after it averages them all."""
        previous = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def _on_grad(self, i: int, param: torch.Tensor) -> None:
        self._used_since_sync.add(i)
        if not self._expect_grads:
            return
        task = torch._C._current_graph_task_id()
        if not self._callback_queued:
            self._callback_queued, self._task = True, task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        elif task != self._task:  # the wait queued on one backward would run before the other one ends
            raise RuntimeError(
                f"parameter {self._names[i]!r} got its gradient in a nested backward (reentrant activation "
                "checkpointing); DistributedDataParallel needs one backward per step: use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
            )
        self.reducer.ready(i)

    def _end_of_backward(self) -> None:
        """Wait for every bucket; a parameter without a gradient on some rank is an error unless allowed."""
        self._callback_queued = self._expect_grads = False
        late = {i: self._params[i].grad for i in self._used_since_sync if not self.reducer.is_ready[i]}
        self._used_since_sync.clear()
        counts = self.reducer.finish(late)
        size = self.comm.size
        missing = [(name, n) for name, n in zip(self._names, counts) if n < size]
        if missing and not (self.find_unused_parameters or self.static_graph):
            listed = ", ".join(f"{name!r} (gradient on {n} of {size} ranks)" for name, n in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise RuntimeError(
                f"DistributedDataParallel: {len(missing)} parameter(s) got no gradient in this backward on some "
                f"rank: {listed}{more}. Use the same parameters on every rank, or pass "
                "find_unused_parameters=True so unused ones count as zero gradients"
            )


def _hook(ddp: weakref.ref, i: int, param: torch.Tensor) -> None:
    wrapper = ddp()
    if wrapper is not None:
        wrapper._on_grad(i, param)


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _communicator(comm: Communicator | None, process_group: Any) -> Communicator:
    if comm is not None and process_group is not None:
        raise ValueError("pass the communicator as comm or as process_group, not both")
    chosen = comm if comm is not None else process_group
    if chosen is None:
        return init()
    if not isinstance(chosen, Communicator):
        raise TypeError(
            f"comm/process_group must be a distrib Communicator (from distrib.init()), got {type(chosen).__name__}; "
            "torch.distributed process groups are not used by distrib's DDP, leave it None for the default"
        )
    return chosen


def _input_device(
    device_ids: Sequence[int | torch.device] | None, output_device: Any, params: Sequence[torch.Tensor]
) -> torch.device | None:
    """The device inputs are moved to before forward (device_ids[0]), or None to leave them alone."""
    types = {p.device.type for p in params}
    if len(types) != 1:
        raise ValueError(f"the module's parameters must all be on one device type, found {sorted(types)}")
    if device_ids is not None and len(device_ids) > 1:
        raise ValueError(
            f"device_ids can only be None or hold one device, got {list(device_ids)}; run one process per device"
        )
    if not device_ids:
        if output_device is not None:
            raise ValueError("output_device needs device_ids; leave both None for a CPU or multi-device module")
        return None
    devices = {p.device for p in params}
    if types == {"cpu"} or len(devices) > 1:
        raise ValueError(
            f"device_ids={list(device_ids)} is for a module on one GPU, but its parameters are on "
            f"{sorted(map(str, devices))}; leave device_ids None"
        )
    first = device_ids[0]
    index = first.index if isinstance(first, torch.device) else int(first)
    return torch.device(next(iter(types)), index)


def _to(obj: Any, device: torch.device) -> Any:
    """Tensors in nested tuples, lists and dicts moved to `device`, everything else as it was."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_to(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {key: _to(value, device) for key, value in obj.items()}
    return obj


def _describe(entry: tuple | None) -> str:
    return "missing" if entry is None else f"{entry[1]!r} {entry[3]} {entry[2]}"


def _check_same_model(comm: Communicator, module: nn.Module) -> None:
    """Raise on every rank, naming the first parameter or buffer that differs across ranks, before any broadcast."""
    tensors = [("parameter", *item) for item in module.named_parameters()]
    tensors += [("buffer", *item) for item in module.named_buffers()]
    mine = [(kind, name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for kind, name, t in tensors]
    everyone = comm.allgather_object(mine)
    for k in range(max(len(entries) for entries in everyone)):
        column = [entries[k] if k < len(entries) else None for entries in everyone]
        ranks = [r for r, entry in enumerate(column) if entry != column[0]]
        if ranks:
            kind = (column[0] or column[ranks[0]])[0]
            raise ValueError(
                f"DistributedDataParallel: the model differs across ranks at {kind} #{k}: {_describe(column[0])} on "
                f"rank 0 but {_describe(column[ranks[0]])} on rank(s) {ranks}; build the same model on every rank"
            )


def _broadcast_(comm: Communicator, tensors: Sequence[torch.Tensor], root: int = 0) -> None:
    """Overwrite `tensors` with rank root's values: one broadcast of their bytes per device."""
    if comm.size == 1 or not tensors:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, group in by_device.items():
        nbytes = [t.numel() * t.element_size() for t in group]
        offsets = [0]
        for n in nbytes:
            offsets.append(offsets[-1] + -(-n // 16) * 16)  # 16-byte aligned, so each slice views as its dtype
        flat = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
        with torch.no_grad():
            for t, start, n in zip(group, offsets, nbytes):
                flat[start : start + n].copy_(t.detach().reshape(-1).view(torch.uint8))
            comm.broadcast(flat, root)
            if comm.rank != root:
                for t, start, n in zip(group, offsets, nbytes):
                    t.copy_(flat[start : start + n].view(t.dtype).view(t.shape))
