"""DistributedDataParallel: torch's constructor, forward, hooks, join and pickling, over a distrib Communicator.

Hooks only: a post-accumulate-grad hook per parameter hands its gradient to the Reducer (reducer.py), which does
what torch's C++ reducer does. The checks and messages are torch's; the README lists every argument and method.
Longer than the 300-line budget because it is one class with torch's whole public surface, argument by argument.
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial, wraps
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from distrib.comm import Communicator
from distrib.comm.coalesced import broadcast_
from distrib.ddp import messages
from distrib.ddp.arguments import buffer_sync, check_module, communicator, devices, to_device
from distrib.ddp.buckets import DEFAULT_CAP_MB, FIRST_BUCKET_BYTES, MIB
from distrib.ddp.graph import find_tensors, through_sink, unused_parameters
from distrib.ddp.join import Joining
from distrib.ddp.logging_data import LoggingData
from distrib.ddp.reducer import Reducer
from distrib.ddp.states import check_same_model, reducer_parameters, synced_buffers, synced_state
from distrib.hooks import Bucket, allreduce_hook, fp16_compress_hook
from distrib.process import STATE, init

_engine = torch.autograd.Variable._execution_engine
_UNSUPPORTED = ("delay_all_reduce_named_params", "param_to_hook_all_reduce", "mixed_precision", "device_mesh",
                "bucket_cap_mb_list")  # fmt: skip
_UNPICKLED = ("comm", "reducer", "process_group", "_handles", "_comm_hooks")


def _outside_compiler(fn: Callable) -> Callable:
    """torch.compiler.disable, made on first use under the compiler: importing it costs each process over a second
    (torch's DDP pays it in its constructor), and nothing is compiled before it is imported."""
    disabled: list[Callable] = []

    @wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


class DistributedDataParallel(Joining, LoggingData, TorchDDP):
    """Wraps `module` so that backward averages its gradients over all ranks; a drop-in for torch's DDP.

    A subclass of torch's, so torch's own tools that look for a DDP (torch.distributed.checkpoint's state dicts,
    pipelining's no_sync) find one; none of torch's state or methods is used: every one is distrib's.

    Arguments as torch's, plus `comm` (a Communicator; None: `distrib.init()`) and `algorithm` (one of
    distrib.ALGORITHMS; None: the communicator's default). `process_group` may be a torch ProcessGroup (then the
    collectives go over it) or a Communicator.
    """

    def __init__(
        self,
        module: nn.Module,
        device_ids: Sequence[int | torch.device] | None = None,
        output_device: int | torch.device | None = None,
        dim: int = 0,
        broadcast_buffers: bool | None = None,
        init_sync: bool = True,
        process_group: Any = None,
        bucket_cap_mb: float | None = None,
        find_unused_parameters: bool = False,
        check_reduction: bool = False,
        gradient_as_bucket_view: bool = False,
        static_graph: bool = False,
        delay_all_reduce_named_params: Any = None,
        param_to_hook_all_reduce: Any = None,
        mixed_precision: Any = None,
        device_mesh: Any = None,
        skip_all_reduce_unused_params: bool = False,
        bucket_cap_mb_list: list[int] | None = None,
        batched_grad_copy: bool = False,
        forward_sync_buffers: bool | None = None,
        *,
        comm: Communicator | None = None,
        algorithm: str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not torch's DDP's: its reducer and hooks are distrib's
        Joining.__init__(self)
        LoggingData.__init__(self)
        given = {name: value for name, value in locals().items() if name in _UNSUPPORTED and value is not None}
        if given or skip_all_reduce_unused_params:
            name = next(iter(given), "skip_all_reduce_unused_params")
            raise NotImplementedError(f"distrib's DistributedDataParallel does not support {name}; leave it unset")
        self.comm = communicator(comm, process_group)
        self.process_group = self.comm.process_group  # torch's own utilities (Join) need one; None where none
        ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
        self.parameters_to_ignore = ignored
        mine = [p for name, p in module.named_parameters() if name not in ignored]
        if any(hasattr(p, "_in_backward_optimizers") for p in mine):
            raise NotImplementedError(
                "distrib's DistributedDataParallel does not run optimizers in backward "
                "(_apply_optimizer_in_backward): build the optimizer as usual and call optimizer.step() after backward"
            )
        if not any(p.requires_grad for p in mine):
            self._throw(RuntimeError, messages.NO_PARAMETERS)
        self.device_ids, self.output_device, self.device_type = devices(self, device_ids, output_device, mine)
        self.is_multi_device_module = len({p.device for p in mine}) > 1
        self.use_side_stream_for_tensor_copies = False  # torch's name: its to_kwargs and scatter, inherited, read it
        self.static_graph = False
        self.dim, self.module, self.device = dim, module, mine[0].device
        self.forward_sync_buffers, init_sync_buffers = buffer_sync(broadcast_buffers, forward_sync_buffers)
        self.find_unused_parameters = find_unused_parameters
        self.require_backward_grad_sync = True  # False inside no_sync()
        self.require_forward_param_sync = True  # torch's name: sync buffers before the next forward
        self.gradient_as_bucket_view = gradient_as_bucket_view
        if check_reduction:
            warnings.warn(
                "The `check_reduction` argument in `DistributedDataParallel` module is deprecated. Please avoid "
                "using it.", FutureWarning, stacklevel=2,
            )  # fmt: skip
        check_module(self, module, mine)
        if bucket_cap_mb is not None and not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a positive number of MiB, got {bucket_cap_mb}")
        self.bucket_bytes_cap = int((DEFAULT_CAP_MB if bucket_cap_mb is None else bucket_cap_mb) * MIB)
        first_cap = FIRST_BUCKET_BYTES if bucket_cap_mb is None else self.bucket_bytes_cap  # torch: default cap only
        params, names, sparse = reducer_parameters(module, ignored)
        if init_sync:
            check_same_model(self.comm, params, self.comm.rank)
            broadcast_(self.comm, synced_state(module, ignored, init_sync_buffers))
        self.reducer = Reducer(
            self.comm, params, names, first_cap=first_cap, cap=self.bucket_bytes_cap,
            algorithm=self.comm.check_algorithm(algorithm or self.comm.algorithm), grad_as_view=gradient_as_bucket_view,
            find_unused=find_unused_parameters, sparse=sparse,
        )  # fmt: skip
        self._register_hooks()
        self._comm_hooks: list[tuple[Callable, Any]] = []
        self._log_bucket_sizes()
        self._static_graph_delay_allreduce_enqueued = False
        self._divide_by_initial_world_size = True
        self._authoritative_rank: int | None = None
        if static_graph:
            self._set_static_graph()

    def _register_hooks(self) -> None:
        # The hooks hold the wrapper weakly: a parameter's hooks live in C++, where the garbage collector cannot see
        # a cycle back to the wrapper, which would then never be freed (nor its buckets).
        ref = weakref.ref(self)
        self._handles = [
            p.register_post_accumulate_grad_hook(partial(_hook, ref, i)) for i, p in enumerate(self.reducer.params)
        ]
        weakref.finalize(self, _remove, self._handles)

    # Forward.

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        inputs, kwargs = self._pre_forward(*inputs, **kwargs)
        return self._post_forward(self.module(*inputs, **kwargs))

    # Under torch.compile the module is compiled and the bookkeeping around it (collectives, the graph search)
    # runs as it is, not traced: as torch's DDP.
    @_outside_compiler
    def _pre_forward(self, *inputs: Any, **kwargs: Any) -> tuple[Any, Any]:
        grad = torch.is_grad_enabled()
        if grad and self.require_backward_grad_sync:
            self._log_runtime_stats()
            self.reducer.prepare_for_forward()
        work = Join.notify_join_context(self)  # in a join context: "this rank still trains"
        if work:
            self.reducer.join_work, self.reducer.static_world_size = work, self._divide_by_initial_world_size
        try:
            if grad and self.reducer.rebuild_buckets():
                self._has_rebuilt_buckets = True
        except RuntimeError as error:
            self._throw(RuntimeError, str(error), native=True)
        if self.will_sync_module_buffers():
            self._sync_buffers(self.common_rank(True) if self._join_config.enable else 0)
        if self._join_config.enable:
            self.iteration_syncs(joined=False)
        if self.device_ids:
            device = torch.device(self.device_type, self.device_ids[0])
            inputs, kwargs = to_device(inputs, device), to_device(kwargs, device)
        return inputs, kwargs

    @_outside_compiler
    def _post_forward(self, output: Any) -> Any:
        if torch.is_grad_enabled():
            _last(self._handles)
        if torch.is_grad_enabled() and self.require_backward_grad_sync:
            self.require_forward_param_sync = True
            dynamic = self.find_unused_parameters and not self.static_graph
            self.reducer.prepare_for_backward(
                unused_parameters(find_tensors(output), self.reducer.params) if dynamic else None
            )
        else:
            self.require_forward_param_sync = False
        if (self.find_unused_parameters and not self.static_graph) or (
            self.static_graph and not self._static_graph_delay_allreduce_enqueued
        ):
            output = through_sink(self, output)
        return output

    def _sink_reached(self) -> None:
        """The sink's backward, first in the outermost graph task: a static graph's first iteration ends there."""
        if self.static_graph and not self._static_graph_delay_allreduce_enqueued and self.reducer.expect_hooks:
            _engine.queue_callback(self.reducer.delay_all_reduce)
            self._static_graph_delay_allreduce_enqueued = True

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward-backward passes inside accumulate gradients locally; the first one after it averages them all."""
        previous = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    # Buffers.

    def will_sync_module_buffers(self) -> bool:
        return (
            self.require_forward_param_sync
            and self.forward_sync_buffers
            and bool(synced_buffers(self.module, self.parameters_to_ignore))
        )

    @property
    def broadcast_buffers(self) -> bool:
        return self.forward_sync_buffers

    @broadcast_buffers.setter
    def broadcast_buffers(self, value: bool) -> None:
        self.forward_sync_buffers = value

    def _sync_buffers(self, root: int) -> None:
        broadcast_(self.comm, synced_buffers(self.module, self.parameters_to_ignore), root)

    # Comm hooks.

    def register_comm_hook(self, state: object, hook: Callable) -> None:
        """torch's comm hook: hook(state, bucket) -> torch.futures.Future of the reduced bucket, the gradients
        reaching it undivided (distrib.hooks has torch's hooks over a distrib Communicator)."""
        self._check_comm_hook(hook)
        if self._comm_hooks:
            self._throw(RuntimeError, messages.HOOK_ONCE, native=True)
        self._comm_hooks.append((hook, state))
        self._logging["comm_hook"] = getattr(hook, "__qualname__", repr(hook))
        self.reducer.comm_hook = (state, hook)

    def _register_builtin_comm_hook(self, comm_hook_type: Any) -> None:
        """torch's built-in hooks, ALLREDUCE and FP16_COMPRESS, as distrib.hooks' over this wrapper's communicator."""
        if self._comm_hooks:
            self._throw(RuntimeError, messages.BUILTIN_HOOK_ONCE, native=True)
        hook = {"ALLREDUCE": allreduce_hook, "FP16_COMPRESS": fp16_compress_hook}[comm_hook_type.name]
        self._comm_hooks.append((hook, self.comm))
        self._logging["comm_hook"] = str(comm_hook_type)
        self.reducer.comm_hook = (self.comm, hook)

    def _register_buffer_comm_hook(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "distrib's DistributedDataParallel has no buffer comm hooks; buffers follow rank 0 before each forward "
            "(forward_sync_buffers=True), or stay each rank's own (False)"
        )

    def _register_fused_optim(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "distrib's DistributedDataParallel does not run the optimizer in backward; call optimizer.step()"
        )

    def _check_comm_hook(self, hook: Callable) -> None:
        """torch's checks: callable, and annotated (if at all) with torch's GradBucket and Future[Tensor]."""
        if not callable(hook):
            self._throw(TypeError, "Communication hook must be callable.")
        signature = inspect.signature(hook)
        bucket = signature.parameters["bucket"]  # torch's KeyError for a hook without one
        # The annotations are compared with torch's types, as torch does (no communication is involved).
        if bucket.annotation not in (
            inspect.Parameter.empty,
            torch.distributed.GradBucket,
            Bucket,
        ):
            self._throw(ValueError, "Communication hook: bucket annotation should be dist.GradBucket.")
        returned = signature.return_annotation
        if returned not in (inspect.Signature.empty, torch.futures.Future[torch.Tensor]):
            self._throw(
                ValueError, "Communication hook: return annotation should be torch.futures.Future[torch.Tensor]."
            )

    # Static graphs, pickling, and torch's private helpers that scripts use.

    def _set_static_graph(self) -> None:
        if self.static_graph:
            warnings.warn("You've set static_graph to be True, no need to set it again.", stacklevel=2)
            return
        if self.reducer.num_iterations:
            self._throw(RuntimeError, messages.STATIC_TOO_LATE, native=True)
        self.static_graph = True
        self._static_graph_delay_allreduce_enqueued = False
        self.reducer.set_static_graph()
        self._logging["static_graph"] = 1
        if self.find_unused_parameters:
            warnings.warn(
                "You passed find_unused_parameters=true to DistributedDataParallel, `_set_static_graph` will detect "
                "unused parameters automatically, so you do not need to set find_unused_parameters=true, just be "
                "sure these unused parameters will not change during training loop while calling "
                "`_set_static_graph`.", stacklevel=2,
            )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        if self.comm is not STATE.comm:
            raise RuntimeError(
                "DDP Pickling/Unpickling are only supported when using DDP with the default process group. That "
                "is, when you have called init_process_group and have not passed process_group argument to DDP "
                "constructor"
            )
        return {k: v for k, v in self.__dict__.items() if k not in _UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (deepcopy, torch.load) rebuilds its reducer and hooks over the default communicator, as torch's."""
        nn.Module.__setstate__(self, state)
        self.comm = init()
        self.process_group = self.comm.process_group
        self._comm_hooks = []
        params, names, sparse = reducer_parameters(self.module, self.parameters_to_ignore)
        self.reducer = Reducer(
            self.comm, params, names, first_cap=FIRST_BUCKET_BYTES, cap=self.bucket_bytes_cap,
            algorithm=self.comm.algorithm, grad_as_view=self.gradient_as_bucket_view,
            find_unused=self.find_unused_parameters, sparse=sparse,
        )  # fmt: skip
        self._register_hooks()
        if self.static_graph:
            self.reducer.set_static_graph()

    @staticmethod
    def _set_params_and_buffers_to_ignore_for_model(module: nn.Module, params_and_buffers_to_ignore: Any) -> None:
        """Names (relative to `module`) of parameters and buffers DDP neither checks, broadcasts nor reduces."""
        module._ddp_params_and_buffers_to_ignore = params_and_buffers_to_ignore
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name in params_and_buffers_to_ignore:
                tensor._ddp_ignored = True

    @staticmethod
    def _get_data_parallel_params(module: nn.Module, named_params: bool = False) -> Iterator[Any]:
        for item in module.named_parameters() if named_params else module.parameters():
            if not hasattr(item[1] if named_params else item, "_ddp_ignored"):
                yield item

    def _check_reducer_finalized(self) -> None:
        self.reducer.ensure_prior_reduction_finished()

    def _remove_autograd_hooks(self) -> None:
        _remove(self._handles)


def _hook(ddp: weakref.ref, i: int, param: torch.Tensor) -> None:
    wrapper = ddp()
    if wrapper is not None:
        try:
            wrapper.reducer.autograd_hook(i)
        except RuntimeError as error:
            wrapper._throw(RuntimeError, str(error), native=True)


def _last(handles: list) -> None:
    """Each parameter's hook of ours after any the script registered on it since: torch's reducer runs after every
    post-accumulate-grad hook of a tensor, so a script's hook sees this rank's gradient, and what it changes there
    is what gets averaged. A parameter's hooks run in the order of their dict, as C++ walks it: taken out and put
    back, not OrderedDict.move_to_end, which reorders only the Python side."""
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and len(hooks) > 1 and next(reversed(hooks)) != handle.id:
            hooks[handle.id] = hooks.pop(handle.id)


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


# torch's DDP methods that work on its own reducer and state, which distrib's subclass does not have: each refuses,
# naming itself, instead of failing deep inside torch's code.
_TORCH_INTERNALS = (
    "_update_process_group", "_set_sparse_metadata", "_set_ddp_sink_clone", "_setup_in_backward_optimizers",
    "_register_accum_grad_hook", "_register_delay_all_reduce_hook", "_delayed_all_reduce_hook",
    "_fire_reducer_autograd_hook", "_match_all_reduce_for_bwd_pass", "_match_unused_params_allreduce",
    "_check_global_requires_backward_grad_sync", "_check_and_sync_module_buffers", "_check_sync_bufs_pre_fwd",
    "_check_sync_bufs_post_fwd", "_sync_module_buffers", "_default_broadcast_coalesced",
    "_distributed_broadcast_coalesced", "_find_common_rank", "_lazy_init", "_run_ddp_forward", "_ddp_init_helper",
    "_build_params_for_reducer", "_assign_modules_buffers", "_build_debug_param_to_name_mapping", "_log_and_throw",
    "_check_default_group", "_get_parameters", "_root_copy_hook", "_module_wait_for_copy_hook", "_clear_grad_buffer",
    "_passing_sync_batchnorm_handle", "_inside_ddp_forward",
)  # fmt: skip


def _refused(name: str) -> Callable[..., Any]:
    def refused(self: DistributedDataParallel, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"distrib's DistributedDataParallel does not have torch's {name}: it works on torch's own reducer; "
            "see the README's table of torch's arguments and methods"
        )

    refused.__name__ = refused.__qualname__ = name
    return refused


for _name in _TORCH_INTERNALS:
    setattr(DistributedDataParallel, _name, _refused(_name))
