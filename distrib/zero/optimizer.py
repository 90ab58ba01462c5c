"""ZeroOffloadOptimizer: Adam/AdamW whose state is split across ranks and kept on the CPU (ZeRO-2 with offload).

Every rank holds the whole model; rank r keeps fp32 master weights and Adam moments for shard r of the flat
parameter buffer only (layout.py), in CPU memory: none on the GPU. One step: reduce-scatter the gradients
(averaged over ranks, on the parameters' device), then tile by tile (tiles.py) copy the owned shard's gradient to
pinned CPU memory, run Adam on the fp32 master there, copy it back in the parameters' dtype while the next tile
steps, and allgather the shards straight into the parameters.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from distrib.comm import Communicator
from distrib.comm.coalesced import broadcast_
from distrib.process import init
from distrib.zero.cpu_adam import adam_groups_
from distrib.zero.groups import HYPER, check_flags, check_group, value
from distrib.zero.layout import FlatLayout, check_params, flatten_
from distrib.zero.presence import Presence
from distrib.zero.saving import StateDicts
from distrib.zero.scaling import found_inf_anywhere
from distrib.zero.tiles import TILE_NUMEL, Offload, check_tile

__all__ = ["ZeroOffloadOptimizer"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ZeroOffloadOptimizer(StateDicts, torch.optim.Optimizer):
    """Adam/AdamW for a plain (unwrapped) model, its state sharded over ranks and offloaded to the CPU.

    Use it like torch.optim.AdamW: ``loss.backward(); opt.step(); opt.zero_grad()``, and clip with
    ``opt.clip_grad_norm_(max_norm)`` between the last backward and step(). Gradients accumulate in ``.grad``
    over micro-batches; only step() communicates. ``delay_update=True`` (the ZeRO-Offload paper's DPU) runs the
    CPU step of step t in a thread while step t+1 computes: each gradient is then taken at parameters one update
    older than without it, which changes the math; ``flush()`` applies the update still in flight. step() consumes
    the gradients (``.grad`` reads zero after it); a step in which no parameter has a gradient is skipped, as
    torch's; one in which only some have none, or a second step() with no zero_grad() between, raises
    (presence.py). ``tile_numel``: elements per tile of the offloaded step (None: the whole shard at once, no
    overlap of copies and CPU work). weight_decay defaults to AdamW's 0.01, or Adam's 0 with ``adamw=False``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        adamw: bool = True,
        *,
        comm: Communicator | None = None,
        algorithm: str | None = None,
        delay_update: bool = False,
        tile_numel: int | None = TILE_NUMEL,
        buffers: Iterable[Tensor] = (),
        amsgrad: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        params = list(params)
        check_tile(tile_numel)
        check_flags(amsgrad=amsgrad, maximize=maximize, differentiable=differentiable, capturable=capturable)
        if not params:
            raise ValueError("ZeroOffloadOptimizer got an empty parameter list; pass model.parameters()")
        weight_decay = (1e-2 if adamw else 0.0) if weight_decay is None else weight_decay
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for g, group in enumerate(self.param_groups):
            if not group["params"]:
                raise ValueError(f"param group {g} has no parameters; the flat layout needs one in each: leave it out")
            check_group(group, adamw)
        self._params: list[Tensor] = [p for group in self.param_groups for p in group["params"]]
        check_params(self._params, DTYPES)
        self._presence = Presence(self._params)
        self.comm = comm if comm is not None else init()
        self.algorithm, self.adamw, self.delay_update = algorithm, adamw, delay_update
        sizes = tuple(len(group["params"]) for group in self.param_groups)
        self.layout = FlatLayout(tuple(p.shape for p in self._params), sizes, self.comm.size)
        self._flat, self._flat_grad = flatten_(self._params, self.layout)
        self._views, self._grads = self.layout.views(self._flat), self.layout.views(self._flat_grad)
        self.comm.broadcast(self._flat, 0)  # every rank starts from rank 0's weights
        self._buffers = list(buffers)  # kept rank 0's, as DDP's broadcast_buffers keeps them
        broadcast_(self.comm, self._buffers)
        self._own = self._flat[self.layout.shard(self.comm.rank)]
        self._spans = self.layout.group_spans(self.comm.rank)
        self._exp_avg, self._exp_avg_sq = (torch.zeros(self._own.numel()) for _ in range(2))
        # fp32 parameters on the CPU, not delayed: the owned shard itself is the master, updated in place.
        separate = delay_update or self._flat.dtype != torch.float32 or self._flat.device.type != "cpu"
        self._master: Tensor | None = None if separate else self._own  # separate: read from the parameters
        # Separate: the reduced gradient and the master go through the host side, tile by tile.
        self._offload = Offload(self._own, tile_numel, [span.start for _, span in self._spans]) if separate else None
        self._steps = 0
        self._reduced: Tensor | None = None  # this step's averaged gradient shard, once reduce-scattered
        self._pending: Future | None = None  # delay_update: the CPU step in flight
        self._unpublished = False  # the owned shard of the parameters lags the master
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="zero-cpu-step") if delay_update else None
        # Set by every gradient accumulation, so zero_grad() right after step() skips a second memset. The
        # hooks hold only the event, never the optimizer and its state.
        self._dirty = threading.Event()
        self._dirty.set()  # gradients present before construction were copied in
        for i, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(self._presence.hook(i, self._dirty))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "layout"):
            raise RuntimeError("ZeroOffloadOptimizer's flat layout is fixed at construction; pass every group then")
        super().add_param_group(param_group)

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands itself to step(): scaling.py

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, grad_scaler: Any = None) -> Any:
        """Reduce-scatter the gradients, Adam on the owned shard on the CPU, allgather the parameters.

        `grad_scaler`: passed by torch.amp.GradScaler.step(opt); the step is skipped on every rank if any rank's
        gradients hold an inf or NaN, as under DDP."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # settings changed since construction, by hand or by a scheduler
            check_group(group, self.adamw)
        if self._reduced is not None and self._dirty.is_set():
            raise RuntimeError(
                "a backward ran after opt.clip_grad_norm_() and before step(): clip_grad_norm_ averages the "
                "gradients then, so later ones would be lost. Call it after the last backward of the step"
            )
        if grad_scaler is not None and found_inf_anywhere(self.comm, grad_scaler, self, self._reduced is not None):
            self._restore_grads()
            return loss
        grad = self._reduce()
        if grad is None:  # no gradient anywhere: torch's step would change nothing
            return loss
        self._wait()  # delay_update: the previous CPU step is done with the CPU buffers
        master = self._master_shard()
        self._steps += 1
        # The hyperparameters are read now: a scheduler may change lr while a delayed step still runs.
        hyper = [(span, {k: value(self.param_groups[g][k]) for k in HYPER}) for g, span in self._spans]
        self._reduced = None
        offload, steps = self._offload, self._steps
        if offload is None:  # fp32 on the CPU: the reduced shard is the gradient, the owned shard the master
            self._cpu_step(master, grad, steps, hyper)
            self._unpublished = True
        elif self._worker is None:  # down, step, up, tile by tile; the owned shard is then this step's
            offload.step(grad, master, lambda tile: self._cpu_step(master, offload.grad, steps, hyper, tile))
            self._allgather()
        else:
            offload.download(grad)  # the CPU step takes it from there while the next step computes
        self._flat_grad.zero_()  # the reduce-scatter left scratch there; the next backward adds to zeros
        self._dirty.clear()
        self._presence.consume()
        self._restore_grads()
        self._publish()  # delay_update: the previous step's weights
        if self._worker is not None:
            self._pending = self._worker.submit(self._cpu_step, master, offload.grad, steps, hyper)
            self._unpublished = True
        broadcast_(self.comm, self._buffers)
        return loss

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None
    ) -> Tensor:
        """Scale this step's averaged gradients to a global norm of at most max_norm; returns the norm before.

        As torch.nn.utils.clip_grad_norm_ on the whole model, but the norm is summed over every rank's shard.
        Call it after the last backward of the step, before step(): it runs step()'s reduce-scatter early, and
        until step() the parameters' `.grad` is None (the averages live sharded, each rank holding its own part).
        """
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 (2.0 for the Euclidean norm, inf for the max), got {norm_type!r}")
        shard = self._reduce()
        if shard is None:  # no gradients: torch's norm of none
            return torch.zeros(())
        for p in self._params:  # what .grad held is the reduce-scatter's scratch now
            p.grad = None
        part = shard.float().abs()
        if math.isinf(norm_type):
            total = self.comm.allreduce(part.max().reshape(1), op="max", algorithm=self.algorithm)[0]
        else:
            local = part.pow_(norm_type).sum().reshape(1)
            total = self.comm.allreduce(local, op="sum", algorithm=self.algorithm)[0] ** (1.0 / norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
                "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
                "`error_if_nonfinite=False`"
            )
        shard.mul_((max_norm / (total + 1e-6)).clamp(max=1.0))  # torch's formula, to the last bit
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place. They stay views of the flat gradient buffer: None would cut them loose."""
        if self._dirty.is_set() or self._reduced is not None:
            self._flat_grad.zero_()
            self._dirty.clear()
        self._restore_grads()
        self._reduced = None
        self._presence.cleared(set_to_none)

    def flush(self) -> None:
        """Finish a delayed CPU step and write it into the parameters (delay_update=True); else a no-op."""
        self._wait()
        self._publish()

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds on the CPU: moments, separate master, staging buffers."""
        tensors = [self._exp_avg, self._exp_avg_sq, self._master if self._master is not self._own else None]
        staging = self._offload.nbytes() if self._offload is not None else 0
        return staging + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # The steps of a step.

    def _reduce(self) -> Tensor | None:
        """This step's gradient shard averaged over ranks, reduce-scattered on first use; None if no parameter has a
        gradient on any rank."""
        if self._reduced is None:
            if not self._presence.check(self.comm, self._params, self._grads):
                return None
            for i, (p, view, grad) in enumerate(zip(self._params, self._views, self._grads)):
                if p.data_ptr() != view.data_ptr():
                    raise RuntimeError(
                        f"parameter {i} {tuple(p.shape)} no longer lives in the optimizer's flat buffer (the "
                        "model was moved or its .data replaced); move the model before building the optimizer"
                    )
                if p.grad is None:  # e.g. model.zero_grad() set it to None and no backward reached it since
                    grad.zero_()
                elif p.grad.data_ptr() != grad.data_ptr():
                    grad.copy_(p.grad)
                p.grad = grad
            self._reduced = self.comm.reduce_scatter(self._flat_grad, op="avg", algorithm=self.algorithm)
            self._dirty.clear()  # set again by a backward before step(): an error there
        return self._reduced

    def _restore_grads(self) -> None:
        """`.grad` as the flat gradient buffer's views again (clip_grad_norm_ set them to None)."""
        for p, grad in zip(self._params, self._grads):
            p.grad = grad

    def _cpu_step(
        self, master: Tensor, grad: Tensor, step: int, hyper: list[tuple[slice, dict]], tile: slice = slice(0, None)
    ) -> None:
        adam_groups_(master, grad, self._exp_avg, self._exp_avg_sq, step=step, hyper=hyper, adamw=self.adamw, tile=tile)

    def _publish(self) -> None:
        """Bring the master to the parameters (in their dtype, onto their device) and allgather the shards."""
        if not self._unpublished:
            return
        if self._offload is not None:
            self._offload.upload(self._master)
        self._allgather()

    def _allgather(self) -> None:
        """Every rank's owned shard into the flat parameters, so every rank holds the updated model."""
        self.comm.allgather(self._own, out=self._flat, algorithm=self.algorithm)
        self._unpublished = False

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises what the CPU step raised

    def _master_shard(self) -> Tensor:
        if self._master is None:  # taken from the parameters at first use, so weights loaded after __init__ count
            pinned = self._own.is_cuda  # the master is an upload's source
            self._master = torch.zeros(self._own.numel(), pin_memory=pinned).copy_(self._own)
        return self._master
