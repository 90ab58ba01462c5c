"""Adam/AdamW on a flat fp32 CPU shard in one fused pass: the optimizer step of ZeRO-Offload.

The work is done by torch's fused CPU kernel (what ``torch.optim.Adam(fused=True)`` runs): one multithreaded,
vectorised pass over param, grad, exp_avg and exp_avg_sq that allocates nothing the size of the shard.
A bf16/fp16 model takes the updated fp32 master with ``model_shard.copy_(param)`` (round to nearest even).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["adam_groups_", "adam_step_"]


def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool,
    maximize: bool = False,
) -> None:
    """One Adam step in place on param, exp_avg, exp_avg_sq; grad is read and left unchanged.

    ``step`` counts steps including this one (1 on the first call). ``adamw=True`` decays the weights
    decoupled from the gradient (torch.optim.AdamW); ``adamw=False`` adds ``weight_decay * param`` to the
    gradient (torch.optim.Adam). All four tensors: 1-D, contiguous, float32, on the CPU, of one length.
    """
    _check_tensors(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _check_hyperparameters(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    # The op's schema marks grads as written: the CPU kernel writes them only to unscale by a grad_scale
    # (AMP), which is never passed here, so the caller's gradient survives the step. The kernel reads the
    # step from a float32 tensor, as torch.optim keeps it.
    _fused_kernel(adamw)(
        [param],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],  # max_exp_avg_sqs: AMSGrad only
        [torch.tensor(float(step))],
        amsgrad=False,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )


def adam_groups_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    hyper: Sequence[tuple[slice, dict]],
    adamw: bool,
    tile: slice = slice(0, None),
) -> None:
    """adam_step_ on the elements of `tile` of flat shards, each param group's span with its own hyperparameters.

    hyper: (span of the shard, param group with lr, betas, eps, weight_decay) per group. Adam is elementwise, so
    stepping the shard tile by tile gives the very same numbers as stepping it whole.
    """
    end = param.numel() if tile.stop is None else tile.stop
    for span, group in hyper:
        part = slice(max(span.start, tile.start), min(span.stop, end))
        if part.start >= part.stop:
            continue
        (beta1, beta2), args = group["betas"], {k: group[k] for k in ("lr", "eps", "weight_decay")}
        moments = exp_avg[part], exp_avg_sq[part]
        adam_step_(param[part], grad[part], *moments, step=step, beta1=beta1, beta2=beta2, adamw=adamw, **args)


def _fused_kernel(adamw: bool) -> Callable[..., None]:
    """torch's private fused Adam op, looked up here only, so a torch without it fails with the fix."""
    name = "_fused_adamw_" if adamw else "_fused_adam_"
    kernel = getattr(torch, name, None)
    if kernel is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.{name}, the fused CPU Adam kernel distrib's CPU step "
            "uses; install torch>=2.4 (the release that added it)"
        )
    return kernel


def _check_tensors(**tensors: Tensor) -> None:
    """Fail before any write, naming the tensor, if the kernel would reject or silently misread it."""
    length = tensors["param"].numel() if isinstance(tensors["param"], Tensor) else None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"adam_step_: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(
                f"adam_step_: {name} is on {t.device}; the offloaded optimizer state lives on the CPU, "
                f"pass {name}.cpu()"
            )
        if t.dtype != torch.float32:
            raise ValueError(
                f"adam_step_: {name} has dtype {t.dtype}; the master weights, gradient and moments are "
                f"float32, pass {name}.float() and copy low-precision parameters from the master afterwards"
            )
        if t.dim() != 1:
            raise ValueError(f"adam_step_: {name} has shape {tuple(t.shape)}; pass the flat shard, {name}.view(-1)")
        if not t.is_contiguous():
            raise ValueError(
                f"adam_step_: {name} is not contiguous (stride {t.stride()}); pass {name}.contiguous() "
                "or a slice of a flat buffer"
            )
        if t.numel() != length:
            raise ValueError(
                f"adam_step_: {name} has {t.numel()} elements but param has {length}; "
                "all four tensors must cover the same shard"
            )


def _check_hyperparameters(
    *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> None:
    """The ranges torch.optim.Adam accepts, plus step >= 1 (step 0 divides by a zero bias correction)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"adam_step_: step must be an int >= 1 counting this step, got {step!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"adam_step_: {name} must be in [0, 1), got {value!r}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not value >= 0.0:  # also rejects NaN
            raise ValueError(f"adam_step_: {name} must be >= 0, got {value!r}")
