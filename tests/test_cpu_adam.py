"""distrib.cpu_adam against torch.optim's plain for-loop Adam/AdamW, element by element, and its bad inputs."""

import pytest
import torch

from distrib.zero.cpu_adam import adam_step_

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
STEPS = 100
# rtol 1e-6 is ~8 fp32 ulps. The atol is for values near zero reached by cancellation: m = 0.9 m + 0.1 g
# (and the parameters) inherit an absolute rounding error of a few ulps of the O(1) terms they come from
# (ulp(4.0) * 0.1 = 5e-8 for the largest gradients drawn), which no relative tolerance covers near zero.
# 1e-7 is 1e-5 of one step's update (lr = 1e-2), far below what a wrong formula would show.
TOL = {"rtol": 1e-6, "atol": 1e-7}


def _reference(p0: torch.Tensor, adamw: bool, maximize: bool) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """torch's single-tensor for-loop implementation, independent of the fused kernel under test."""
    ref = p0.clone().requires_grad_()
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls(
        [ref],
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
        maximize=maximize,
        foreach=False,
        fused=False,
    )
    return ref, opt


def _run(n: int, adamw: bool, maximize: bool = False, grad_dtype: torch.dtype = torch.float32):
    """STEPS steps of ours and of the reference on identical random gradients; returns both states."""
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen).to(grad_dtype).float()
    ref, opt = _reference(p0, adamw, maximize)
    param, exp_avg, exp_avg_sq = p0.clone(), torch.zeros(n), torch.zeros(n)
    for step in range(1, STEPS + 1):
        grad = torch.randn(n, generator=gen).to(grad_dtype).float()
        ref.grad = grad.clone()
        opt.step()
        adam_step_(param, grad, exp_avg, exp_avg_sq, step=step, adamw=adamw, maximize=maximize, **HYPER)
        assert torch.equal(grad, ref.grad), "adam_step_ must leave the gradient unchanged"
    state = opt.state[ref]
    return (param, exp_avg, exp_avg_sq), (ref.detach(), state["exp_avg"], state["exp_avg_sq"]), p0


@pytest.mark.parametrize("adamw", [True, False], ids=["adamw", "adam_l2"])
@pytest.mark.parametrize("n", [1, 22, 1024, 10**6 + 3])
def test_matches_torch_elementwise(n: int, adamw: bool) -> None:
    ours, ref, p0 = _run(n, adamw)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(ours[0], p0)


@pytest.mark.parametrize("adamw", [True, False], ids=["adamw", "adam_l2"])
def test_maximize_matches_torch(adamw: bool) -> None:
    ours, ref, _ = _run(1024, adamw, maximize=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_follow_fp32_master(dtype: torch.dtype) -> None:
    """A bf16/fp16 model with an fp32 master: after the steps, model == fp32 reference cast to dtype."""
    (master, _, _), (ref, _, _), p0 = _run(1024, adamw=True, grad_dtype=dtype)
    model = p0.to(dtype)  # exact: p0 was drawn in dtype
    model.copy_(master)
    torch.testing.assert_close(model, ref.to(dtype), rtol=0, atol=0)
    assert not torch.equal(model, p0.to(dtype))


def _tensors(n: int = 8) -> dict[str, torch.Tensor]:
    return {
        "param": torch.randn(n),
        "grad": torch.randn(n),
        "exp_avg": torch.zeros(n),
        "exp_avg_sq": torch.zeros(n),
    }


BAD_TENSORS = {
    "short": ("exp_avg_sq", lambda t: t[:-1], r"exp_avg_sq has 7 elements but param has 8"),
    "fp16_master": ("param", lambda t: t.half(), r"param has dtype torch.float16.*param.float\(\)"),
    "fp64_grad": ("grad", lambda t: t.double(), r"grad has dtype torch.float64"),
    "strided": ("exp_avg", lambda t: torch.zeros(16)[::2], r"exp_avg is not contiguous.*contiguous\(\)"),
    "2d": ("grad", lambda t: t.view(2, 4), r"grad has shape \(2, 4\).*view\(-1\)"),
    "not_cpu": ("exp_avg", lambda t: t.to("meta"), r"exp_avg is on meta.*exp_avg.cpu\(\)"),
}


@pytest.mark.parametrize("case", BAD_TENSORS, ids=list(BAD_TENSORS))
def test_bad_tensor_fails_naming_it(case: str) -> None:
    name, spoil, message = BAD_TENSORS[case]
    tensors = _tensors()
    before = tensors["param"].clone()
    tensors[name] = spoil(tensors[name])
    with pytest.raises(ValueError, match=message):
        adam_step_(**tensors, step=1, adamw=True, **HYPER)
    assert name == "param" or torch.equal(tensors["param"], before), "checks must run before any write"


def test_missing_tensor_is_a_type_error() -> None:
    tensors = _tensors()
    tensors["grad"] = None
    with pytest.raises(TypeError, match="grad must be a torch.Tensor, got NoneType"):
        adam_step_(**tensors, step=1, adamw=True, **HYPER)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"step": 0}, r"step must be an int >= 1.*got 0"),
        ({"step": 2.0}, r"step must be an int >= 1.*got 2.0"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1.0"),
        ({"beta2": -0.5}, r"beta2 must be in \[0, 1\), got -0.5"),
        ({"lr": -1e-3}, r"lr must be >= 0, got -0.001"),
        ({"eps": float("nan")}, r"eps must be >= 0, got nan"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got -0.1"),
    ],
)
def test_bad_hyperparameter_fails_naming_it(override: dict, message: str) -> None:
    kwargs = {**HYPER, "step": 1, **override}
    with pytest.raises(ValueError, match=message):
        adam_step_(**_tensors(), adamw=False, **kwargs)


@pytest.mark.parametrize("adamw, op", [(True, "_fused_adamw_"), (False, "_fused_adam_")])
def test_torch_without_fused_kernel_fails_with_the_fix(monkeypatch, adamw: bool, op: str) -> None:
    monkeypatch.delattr(torch, op)
    with pytest.raises(RuntimeError, match=rf"no torch.{op}.*torch>=2.4"):
        adam_step_(**_tensors(), step=1, adamw=adamw, **HYPER)
