"""torch's DDP error and warning texts, word for word, so that code and tests written against torch's DDP read the
same messages from distrib's; where distrib can say more (every rank's view), it adds to them."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger("distrib")

NO_PARAMETERS = (
    "DistributedDataParallel is not needed when a module doesn't have any parameter that requires a gradient."
)
GRAPH_CHANGED = (
    "Your training graph has changed in this iteration, e.g., one parameter is unused in first iteration, but then "
    "got used in the second iteration. this is not compatible with static_graph set to True."
)
STATIC_TOO_LATE = (
    "set_static_graph() should be called before training loop starts and after DistributedDataParallel is constructed."
)
HOOK_ONCE = "register_comm_hook or register_builtin_comm_hook can only be called once."
BUILTIN_HOOK_ONCE = "register_builtin_comm_hook or register_comm_hook can only be called once."
_MARKED_TWICE = (
    "Expected to mark a variable ready only once. This error is caused by one of the following reasons: 1) Use of a "
    "module parameter outside the `forward` function. Please make sure model parameters are not shared across "
    "multiple concurrent forward-backward passes. or try to use _set_static_graph() as a workaround if this module "
    "graph does not change during training loop.2) Reused parameters in multiple reentrant backward passes. For "
    "example, if you use multiple `checkpoint` functions to wrap the same part of your model, it would result in "
    "the same set of parameters been used by different reentrant backward passes multiple times, and hence marking "
    "a variable ready multiple times. DDP does not support such use cases in default. You can try to use "
    "_set_static_graph() as a workaround if your module graph does not change over iterations."
)
_UNFINISHED = (
    "Expected to have finished reduction in the prior iteration before starting a new one. This error indicates "
    "that your module has parameters that were not used in producing loss. "
)
_UNFINISHED_STATIC = (
    "Expected to have finished reduction in the prior iteration before starting a new one. This error indicates "
    "that your training graph has changed in this iteration, e.g., one parameter is used in first iteration, but "
    "then got unused in the second iteration. this is not compatible with static_graph set to True."
)
_ENABLE_FIND_UNUSED = (
    "You can enable unused parameter detection by passing the keyword argument `find_unused_parameters=True` to "
    "`torch.nn.parallel.DistributedDataParallel`, and by \nmaking sure all `forward` function outputs participate "
    "in calculating loss. "
)
_FIND_UNUSED_ON = (
    "Since `find_unused_parameters=True` is enabled, this likely  means that not all `forward` outputs participate "
    "in computing loss. You can fix this by making sure all `forward` function outputs participate in calculating "
    "loss. "
)
_LOCATE_OUTPUTS = (
    "\nIf you already have done the above, then the distributed data parallel module wasn't able to locate the "
    "output tensors in the return value of your module's `forward` function. Please include the loss function and "
    "the structure of the return value of `forward` of your module when reporting this issue (e.g. list, dict, "
    "iterable)."
)
_DEBUG_HINT = (
    "\n In addition, you can set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or DETAIL to print "
    "out information about which particular parameters did not receive gradient on this rank as part of this error"
)
_CREATE_GRAPH = (
    "Using DistributedDataParallel with create_graph=True  is not well-supported. The higher-order gradient will  "
    "not be synchronized across ranks, and backpropagation  through all_reduce operations will not occur. If you "
    "require  DDP to work with higher-order gradients for your use case,  please ping "
    "https://github.com/pytorch/pytorch/issues/63929"
)
_NO_UNUSED = (
    "find_unused_parameters=True was specified in DDP constructor, but did not find any unused parameters in the "
    "forward pass. This flag results in an extra traversal of the autograd graph every iteration,  which can "
    "adversely affect performance. If your model indeed never has any unused parameters in the forward pass, "
    "consider turning this flag off. Note that this warning may be a false positive if your model has flow control "
    "causing later iterations to have unused parameters."
)
_warned = {"create_graph": False, "no_unused": False}
# The dtype names torch's logging data gives (c10's TypeMeta names).
TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
              torch.bfloat16: "c10::BFloat16", torch.complex64: "c10::complex<float>",
              torch.complex128: "c10::complex<double>"}  # fmt: skip


def _debug() -> bool:
    """TORCH_DISTRIBUTED_DEBUG at INFO or DETAIL: messages name parameters, as torch's then do."""
    return os.environ.get("TORCH_DISTRIBUTED_DEBUG", "OFF").upper() in ("INFO", "DETAIL")


def marked_twice(index: int, name: str) -> str:
    return (
        f"{_MARKED_TWICE}\nParameter at index {index} with name {name} has been marked as ready twice. This means "
        "that multiple autograd engine  hooks have fired for this particular parameter during this iteration."
    )


def unfinished(static: bool, find_unused: bool, rank: int, indices: Sequence[int], names: Sequence[str]) -> str:
    """The error a forward raises when the previous backward left parameters unreduced."""
    if static:
        text = _UNFINISHED_STATIC
    else:
        text = _UNFINISHED + (_FIND_UNUSED_ON if find_unused else _ENABLE_FIND_UNUSED) + _LOCATE_OUTPUTS
    if _debug():  # names in the order torch's unordered set gives them (the last parameter first)
        listed = ", ".join(names[i] for i in sorted(indices, reverse=True))
        text += f"\nParameters which did not receive grad for rank {rank}: {listed}"
    text += f"\nParameter indices which did not receive grad for rank {rank}: {' '.join(map(str, indices))}"
    return text if _debug() else text + _DEBUG_HINT


def hook_not_future(kind: str) -> str:
    return f"DDP communication hook's callback must return a torch.futures.Future object, but got {kind}"


def bad_hook_result(result: Any, numel: int) -> str:
    got = f"{result.numel()} elements" if isinstance(result, torch.Tensor) else f"a {type(result).__name__}"
    return (
        f"the communication hook's future must hold one Tensor of the bucket's {numel} elements, got {got}; "
        "return e.g. fut.then(lambda f: f.value()[0])"
    )


def warn_create_graph() -> None:
    if not _warned["create_graph"]:
        _warned["create_graph"] = True
        log.warning(_CREATE_GRAPH)


def warn_no_unused() -> None:
    """torch's warning, once a process, when searching the graph found every parameter used: logged to stderr, as
    torch's C++ reducer does, not through Python's warnings (which `-W error` would make an exception)."""
    if not _warned["no_unused"]:
        _warned["no_unused"] = True
        log.warning(_NO_UNUSED)
