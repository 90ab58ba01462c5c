"""Many tensors overwritten with one rank's values in one broadcast per device: a model's parameters or buffers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distrib.comm.base import Communicator

_ALIGN = 16  # bytes: each tensor's slice of a broadcast starts where any dtype may view it


def broadcast_(comm: Communicator, tensors: Sequence[torch.Tensor], root: int = 0) -> None:
    """Overwrite `tensors` with rank `root`'s values: one broadcast of their bytes per device.

    Version counters are left as they were (torch's _unsafe_preserve_version_counter): a buffer saved for backward
    by one forward (BatchNorm's running stats) may be refreshed before a second forward without failing that
    backward.
    """
    if comm.size == 1 or not tensors:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, group in by_device.items():
        nbytes = [t.numel() * t.element_size() for t in group]
        offsets = [0]
        for n in nbytes:
            offsets.append(offsets[-1] + -(-n // _ALIGN) * _ALIGN)
        flat = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
        with torch.no_grad():
            for t, start, n in zip(group, offsets, nbytes):
                flat[start : start + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))  # t[::2] too
            comm.broadcast(flat, root)
            if comm.rank != root:
                with torch.autograd._unsafe_preserve_version_counter(tuple(group)):
                    for t, start, n in zip(group, offsets, nbytes):
                        t.copy_(flat[start : start + n].view(t.dtype).view(t.shape))
