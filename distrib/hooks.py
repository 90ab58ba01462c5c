"""Comm hooks for DistributedDataParallel.register_comm_hook, over a distrib Communicator: torch's default hooks
(allreduce, fp16 and bf16 compression) and PowerSGD, on any transport and algorithm.

    ddp.register_comm_hook(comm, distrib.hooks.fp16_compress_hook)     # state: a Communicator (None: distrib.init())
    ddp.register_comm_hook(distrib.hooks.PowerSGDState(comm, matrix_approximation_rank=2), distrib.hooks.powerSGD_hook)

A hook gets the bucket's gradients undivided and returns a torch.futures.Future of the averaged buffer, as torch's
hooks do; torch's own hooks (torch.distributed.algorithms.ddp_comm_hooks) work as they are too. The 16-bit hooks
put half the bytes on the wire where the algorithm moves them as they are (ring, naive, shm; MPI's native
allreduce has no 16-bit float type, so it reduces them in float32).
"""

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as _powersgd

from distrib.comm import Communicator
from distrib.process import init

__all__ = [
    "PowerSGDState",
    "allreduce_hook",
    "bf16_compress_hook",
    "bf16_compress_wrapper",
    "fp16_compress_hook",
    "fp16_compress_wrapper",
    "powerSGD_hook",
]


class Bucket(Protocol):
    """What a hook reads of a bucket (torch.distributed.GradBucket's interface)."""

    def buffer(self) -> torch.Tensor: ...
    def set_buffer(self, buffer: torch.Tensor) -> None: ...


Hook = Callable[[Any, Bucket], torch.futures.Future[torch.Tensor]]


def allreduce_hook(comm: Communicator | None, bucket: Bucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the ranks: divide by the world size first (no overflow in fp16), then sum."""
    comm = comm or init()
    buffer = bucket.buffer().div_(comm.size)
    return comm.allreduce(buffer, async_op=True).get_future()


def _compress_hook(dtype: torch.dtype) -> Hook:
    def hook(comm: Communicator | None, bucket: Bucket) -> torch.futures.Future[torch.Tensor]:
        comm = comm or init()
        buffer = bucket.buffer()
        compressed = buffer.to(dtype).div_(comm.size)
        return comm.allreduce(compressed, async_op=True).get_future().then(lambda fut: buffer.copy_(fut.value()))

    return hook


fp16_compress_hook = _compress_hook(torch.float16)
fp16_compress_hook.__doc__ = "Average in float16: half the bytes on the wire; the result copied back in place."
fp16_compress_hook.__name__ = fp16_compress_hook.__qualname__ = "fp16_compress_hook"
bf16_compress_hook = _compress_hook(torch.bfloat16)
bf16_compress_hook.__doc__ = "Average in bfloat16: half the bytes on the wire; the result copied back in place."
bf16_compress_hook.__name__ = bf16_compress_hook.__qualname__ = "bf16_compress_hook"


def _compress_wrapper(dtype: torch.dtype) -> Callable[[Hook], Hook]:
    def wrapper(hook: Hook) -> Hook:
        def wrapped(state: Any, bucket: Bucket) -> torch.futures.Future[torch.Tensor]:
            buffer = bucket.buffer()
            bucket.set_buffer(buffer.to(dtype))
            return hook(state, bucket).then(lambda fut: buffer.copy_(fut.value()))

        return wrapped

    return wrapper


fp16_compress_wrapper = _compress_wrapper(torch.float16)
fp16_compress_wrapper.__doc__ = "Run `hook` on a float16 copy of the bucket (e.g. around powerSGD_hook)."
bf16_compress_wrapper = _compress_wrapper(torch.bfloat16)
bf16_compress_wrapper.__doc__ = "Run `hook` on a bfloat16 copy of the bucket (e.g. around powerSGD_hook)."


class PowerSGDState(_powersgd.PowerSGDState):
    """torch's PowerSGDState, its allreduces going over a distrib Communicator (None: distrib.init())."""

    def __init__(self, comm: Communicator | None = None, **kwargs: Any) -> None:
        from distrib.comm.torch_pg import CommunicatorGroup

        super().__init__(process_group=CommunicatorGroup(comm or init()), **kwargs)


powerSGD_hook = _powersgd.powerSGD_hook  # torch's own (Vogels et al., 2019), given a PowerSGDState of ours
