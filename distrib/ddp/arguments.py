"""torch's DistributedDataParallel arguments, settled as torch settles them, with torch's errors and warnings."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distrib.comm import Communicator
from distrib.process import init


def communicator(comm: Communicator | None, process_group: Any) -> Communicator:
    if comm is not None and process_group is not None:
        raise ValueError("pass the communicator as comm or as process_group, not both")
    chosen = comm if comm is not None else process_group
    if chosen is None:
        return init()
    if isinstance(chosen, Communicator):
        return chosen
    from distrib.comm.torch_dist import TorchCommunicator

    return TorchCommunicator.over(chosen)


def buffer_sync(broadcast_buffers: bool | None, forward_sync_buffers: bool | None) -> tuple[bool, bool]:
    """(buffers broadcast before each forward, buffers broadcast at construction), with torch 2.13's warnings."""
    if broadcast_buffers is not None:
        if forward_sync_buffers is not None:
            message = (
                "Both `broadcast_buffers` and `forward_sync_buffers` were specified. `broadcast_buffers` is "
                "deprecated and its value is ignored when `forward_sync_buffers` is provided."
            )
        else:
            message = (
                "`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead. IMPORTANT: unlike "
                "`broadcast_buffers=False`, `forward_sync_buffers=False` still syncs buffers at init. If you rely on "
                "buffers NOT being synced at init (e.g. rank-local buffers), keep using `broadcast_buffers=False` "
                "until `init_sync_buffers` is available."
            )
        warnings.warn(message, FutureWarning, stacklevel=3)
    if forward_sync_buffers is not None:
        return forward_sync_buffers, True
    effective = broadcast_buffers if broadcast_buffers is not None else True
    return effective, effective


def devices(ddp: Any, device_ids: Any, output_device: Any, params: Sequence[torch.Tensor]):
    """(device_ids, output_device, device type) as torch settles them, with torch's errors."""
    if device_ids is not None and len(device_ids) > 1:
        ddp._throw(ValueError, "device_ids can only be None or contain a single element.")
    types = {p.device.type for p in params}
    if len(types) != 1:
        ddp._throw(
            ValueError,
            "DistributedDataParallel's input module must be on the same type of devices, but input module "
            f"parameters locate in {types}.",
        )
    kind = next(iter(types))
    devices = {p.device for p in params}
    if not device_ids or kind == "cpu" or len(devices) > 1:
        if device_ids or output_device:
            ddp._throw(
                ValueError,
                "DistributedDataParallel device_ids and output_device arguments only work with "
                "single-device/multiple-device GPU modules or CPU modules, but got device_ids "
                f"{device_ids}, output_device {output_device}, and module parameters {devices}.",
            )
        return None, None, kind
    ids = [d.index if isinstance(d, torch.device) else int(d) for d in device_ids]
    out = ids[0] if output_device is None else output_device
    return ids, out.index if isinstance(out, torch.device) else int(out), kind


def check_module(ddp: Any, module: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """What a module must not hold for distrib's DDP, each with torch's message where torch has one."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        ddp._throw(
            RuntimeError,
            "Modules with uninitialized parameters can't be used with `DistributedDataParallel`. Run a dummy "
            "forward pass to correctly initialize the modules",
        )
    if ddp.device_type == "cpu" and any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        ddp._throw(ValueError, "SyncBatchNorm layers only work with GPU modules")


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors in nested tuples, lists and dicts moved to `device`, everything else as it was."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(to_device(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {key: to_device(value, device) for key, value in obj.items()}
    return obj
