"""What DDP reads from the autograd graph: the tensors in a forward's output, the parameters no path reaches, and
the sink through which outputs pass so that the end of the whole backward can be found.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd import Function
from torch.utils._pytree import tree_flatten, tree_unflatten


def find_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors inside a forward's output: tensors, lists, tuples, dict values, dataclass fields (torch's)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in find_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in find_tensors(item)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for field in dataclasses.fields(obj) for t in find_tensors(getattr(obj, field.name))]
    return []


def unused_parameters(outputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[int]:
    """Indices of `params` that no path of the autograd graph from `outputs` reaches (find_unused_parameters)."""
    seen: set[Any] = set()
    reached: set[int] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: the parameter it accumulates into
        if variable is not None:
            reached.add(id(variable))
        stack.extend(edge for edge, _ in node.next_functions if edge is not None)
    return [i for i, p in enumerate(params) if id(p) not in reached]


class _Sink(Function):
    """The identity on a forward's outputs; its backward runs first, in the outermost graph task, so a callback it
    queues runs after the whole backward, nested (reentrant checkpointing) ones included."""

    @staticmethod
    def forward(ctx, ddp: weakref.ref, *outputs: Any) -> Any:  # type: ignore[override]
        ctx.set_materialize_grads(False)  # outputs left out of the loss get no gradient: their parameters none
        ctx.ddp = ddp
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in outputs)

    @staticmethod
    def backward(ctx, *grads: Any) -> Any:  # type: ignore[override]
        wrapper = ctx.ddp()
        if wrapper is not None:
            wrapper._sink_reached()
        return (None, *grads)


def through_sink(ddp: Any, output: Any) -> Any:
    """`output` with every tensor that has a grad_fn passed through one _Sink; its structure kept (pytree)."""
    leaves, spec = tree_flatten(output)
    routed = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.grad_fn is not None]
    if not routed:
        return output
    passed = _Sink.apply(weakref.ref(ddp), *(leaves[i] for i in routed))
    for i, tensor in zip(routed, passed):
        leaves[i] = tensor
    return tree_unflatten(leaves, spec)
