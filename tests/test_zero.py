"""ZeroOffloadOptimizer in one process (a world of one): layout, torch parity, gradients, bad inputs.

The multi-rank behaviour is tested by tests/ranks/test_zero.py under real launchers (tests/test_zero_ranks.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import distrib
from distrib.comm.local import LocalCommunicator
from distrib.zero import ZeroOffloadOptimizer
from distrib.zero.layout import FlatLayout


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return nn.functional.mse_loss(model(torch.randn(8, 5, generator=gen)), torch.randn(8, 2, generator=gen))


def zero_opt(model: nn.Module, **kwargs) -> ZeroOffloadOptimizer:
    return ZeroOffloadOptimizer(model.parameters(), comm=LocalCommunicator(), **kwargs)


def assert_params_close(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_layout_shards_cover_every_element_once(world_size):
    shapes = (torch.Size([3, 4]), torch.Size([4]), torch.Size([]), torch.Size([2, 5]), torch.Size([7]))
    layout = FlatLayout(shapes, (2, 3), world_size)
    assert layout.numel == 34 and layout.padded % world_size == 0 and layout.padded - 34 < world_size
    owner = torch.full((34,), -1)
    group_of = torch.tensor([0] * 16 + [1] * 18)  # the first two shapes make group 0
    for rank in range(world_size):
        base = layout.shard(rank).start
        for i, inside, at in layout.pieces(rank):
            start = layout.offsets[i] + inside.start
            assert at.start + base == start and at.stop - at.start == inside.stop - inside.start
            assert (owner[start : start + at.stop - at.start] == -1).all()
            owner[start : start + at.stop - at.start] = rank
        for g, span in layout.group_spans(rank):
            lo, hi = base + span.start, min(base + span.stop, 34)
            assert (group_of[lo:hi] == g).all()
    assert (owner == torch.arange(34) // layout.shard_numel).all()  # contiguous shards, rank order


def test_layout_rejects_bad_shapes():
    with pytest.raises(ValueError, match="no elements"):
        FlatLayout((torch.Size([0]),), (1,), 2)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        FlatLayout((torch.Size([3]),), (1,), 0)


def test_parameters_and_gradients_become_views_of_two_flat_buffers():
    model = make_model()
    x = torch.randn(3, 5)
    before = model(x).detach()
    opt = zero_opt(model)
    assert torch.equal(model(x), before)  # same weights, new home
    flat, grads = opt._flat, opt._flat_grad
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    loss(model, 0).backward()
    loss(model, 1).backward()  # accumulates in place
    for p in model.parameters():
        assert p.grad.untyped_storage().data_ptr() == grads.untyped_storage().data_ptr()
    reference = make_model()
    loss(reference, 0).backward()
    loss(reference, 1).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    opt.step()
    assert all(not p.grad.any() for p in model.parameters())  # the reduce-scatter's scratch, cleared


def test_zero_grad_discards_gradients_whenever_called():
    model = make_model()
    loss(model, 0).backward()  # before the optimizer exists: copied into the flat buffer, then zeroed
    opt = zero_opt(model)
    assert model[0].weight.grad.abs().sum() > 0
    for prepare in ("backward", "step then backward", "clip"):
        loss(model, 1).backward()
        if prepare == "step then backward":
            opt.step()
            loss(model, 2).backward()
        if prepare == "clip":
            opt.clip_grad_norm_(1e-3)  # the reduce-scatter ran: the buffer holds scratch
        opt.zero_grad()
        assert not opt._flat_grad.any(), prepare
        assert all(p.grad.data_ptr() >= opt._flat_grad.data_ptr() for p in model.parameters())


@pytest.mark.parametrize(
    "dtype,delay,per_param",
    [(torch.float32, False, 8), (torch.float32, True, 16), (torch.bfloat16, False, 16)],
    ids=["fp32", "fp32-delayed", "bf16"],
)
def test_state_bytes(dtype, delay, per_param):
    """Two fp32 moments; a separate fp32 master and gradient copy unless fp32 CPU weights are updated in place."""
    model = make_model().to(dtype)
    opt = zero_opt(model, delay_update=delay)
    model(torch.randn(2, 5, dtype=dtype)).sum().backward()
    opt.step()  # the master exists from the first step on
    assert opt.state_nbytes() == per_param * 58


@pytest.mark.parametrize("adamw", [True, False], ids=["AdamW", "Adam"])
def test_one_process_matches_torch(adamw):
    model, reference = make_model(), make_model()
    opt = zero_opt(model, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, adamw=adamw)
    torch_opt = (torch.optim.AdamW if adamw else torch.optim.Adam)(
        reference.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1
    )
    for step in range(6):
        for m, o in ((model, opt), (reference, torch_opt)):
            loss(m, step).backward()
            o.step()
            o.zero_grad()
    assert_params_close(model, reference)


def test_model_zero_grad_to_none_and_lr_schedulers_work():
    """model.zero_grad() cuts .grad loose; step() takes the new gradients back. A scheduler's lr is used."""
    model, reference = make_model(), make_model()
    opt, torch_opt = zero_opt(model, lr=0.05), torch.optim.AdamW(reference.parameters(), lr=0.05)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (opt, torch_opt)]
    for step in range(5):
        for m, o, s in zip((model, reference), (opt, torch_opt), schedulers):
            m.zero_grad()  # set_to_none=True
            loss(m, step).backward()
            o.step()
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0005)
    assert_params_close(model, reference)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_matches_torch(norm_type):
    model, reference = make_model(), make_model()
    opt, torch_opt = zero_opt(model, lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(4):
        loss(model, step).backward()
        loss(reference, step).backward()
        norm = opt.clip_grad_norm_(0.05, norm_type)
        torch.testing.assert_close(norm, nn.utils.clip_grad_norm_(reference.parameters(), 0.05, norm_type))
        assert norm > 0.05
        opt.step()
        torch_opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
    assert_params_close(model, reference)


def test_default_communicator_is_distrib_init():
    model = make_model()
    opt = ZeroOffloadOptimizer(model.parameters())
    assert opt.comm is distrib.init() and opt.comm.size == 1


def test_sharded_state_dict_is_the_shard_and_a_consolidated_one_loads_in_adamw():
    model = make_model()
    opt = zero_opt(model, delay_update=True)
    for step in range(3):
        loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    state = opt.state_dict()
    assert state["zero"]["step"] == 3 and set(state["state"]) == {"master", "exp_avg", "exp_avg_sq"}
    reference = copy.deepcopy(model)
    adamw = torch.optim.AdamW(reference.parameters())
    adamw.load_state_dict(opt.consolidated_state_dict())
    for m, o in ((model, opt), (reference, adamw)):
        loss(m, 3).backward()
        o.step()
    opt.flush()
    assert_params_close(model, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_parameters_step_on_pinned_cpu_state():
    model, reference = make_model().cuda(), make_model().cuda()
    opt, torch_opt = zero_opt(model, lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    assert opt._exp_avg.is_pinned() and opt._exp_avg.device.type == "cpu"
    for step in range(4):
        for m, o in ((model, opt), (reference, torch_opt)):
            nn.functional.mse_loss(
                m(torch.ones(2, 5, device="cuda") * step), torch.zeros(2, 2, device="cuda")
            ).backward()
            o.step()
            o.zero_grad()
    assert_params_close(model, reference)


# Bad inputs: each fails at once, naming the value and the fix.


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -0.1}, r"lr must be a float >= 0, got -0\.1"),
        ({"lr": float("nan")}, "lr must be a float >= 0, got nan"),
        ({"lr": "fast"}, "lr must be a float >= 0, got 'fast'"),
        ({"betas": (0.9, 1.0)}, r"betas must be two floats in \[0, 1\), e\.g\. \(0\.9, 0\.999\); got \(0\.9, 1\.0\)"),
        ({"betas": (0.9,)}, r"betas must be two floats"),
        ({"eps": -1e-8}, "eps must be a float >= 0"),
        ({"weight_decay": -1}, "weight_decay must be a float >= 0, got -1"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zero_opt(make_model(), **kwargs)


def test_bad_parameter_lists():
    with pytest.raises(ValueError, match=r"empty parameter list; pass model.parameters\(\)"):
        ZeroOffloadOptimizer([], comm=LocalCommunicator())
    with pytest.raises(ValueError, match=r"empty parameter list"):
        ZeroOffloadOptimizer(nn.ReLU().parameters(), comm=LocalCommunicator())
    with pytest.raises(ValueError, match=r"meta device: it has no values to offload.*to_empty"):
        zero_opt(nn.Linear(3, 3, device="meta"))
    with pytest.raises(TypeError, match=r"dtype torch.float64; .*model.float\(\)"):
        zero_opt(make_model().double())
    frozen = make_model()
    frozen[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"parameter 1 \(7,\) does not require grad; pass only trainable"):
        zero_opt(frozen)
    mixed = make_model()
    mixed[2].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"share one dtype and device.*torch.bfloat16 on cpu, torch.float32 on cpu"):
        zero_opt(mixed)
    w = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"parameter 1 \(3,\) is passed twice"):
        ZeroOffloadOptimizer([w, w], comm=LocalCommunicator())
    with pytest.raises(ValueError, match="non-leaf"):
        ZeroOffloadOptimizer([w * 2], comm=LocalCommunicator())


def test_misuse_after_construction():
    model = make_model()
    opt = zero_opt(model)
    with pytest.raises(RuntimeError, match="layout is fixed at construction"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    with pytest.raises(ValueError, match="max_norm must be >= 0, got -1.0"):
        opt.clip_grad_norm_(-1)
    with pytest.raises(ValueError, match=r"norm_type must be > 0 .*got 0.0"):
        opt.clip_grad_norm_(1.0, norm_type=0)
    model[0].weight.data = torch.zeros(7, 5)  # cut loose from the flat buffer
    loss(model, 0).backward()
    with pytest.raises(RuntimeError, match=r"parameter 0 \(7, 5\) no longer lives in the optimizer's flat buffer"):
        opt.step()


def test_bad_state_dicts():
    model = make_model()
    opt = zero_opt(model)
    loss(model, 0).backward()
    opt.step()
    sharded = opt.state_dict()
    other = copy.deepcopy(sharded)
    other["zero"]["world_size"], other["zero"]["rank"] = 2, 1
    with pytest.raises(ValueError, match=r"saved by rank 1 of 2 for 4 parameters; this is rank 0 of 1.*consolidated"):
        opt.load_state_dict(other)
    consolidated = opt.consolidated_state_dict()
    bigger = zero_opt(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match=r"saved exp_avg of parameter 0 has shape \(7, 5\), the parameter \(8, 5\)"):
        bigger.load_state_dict(consolidated)
    params = list(make_model().parameters())
    split = ZeroOffloadOptimizer([{"params": params[:1]}, {"params": params[1:]}], comm=LocalCommunicator())
    with pytest.raises(ValueError, match=r"saved param groups hold \[4\] parameters, this optimizer's \[1, 3\]"):
        split.load_state_dict(consolidated)
    consolidated["state"][2]["step"] = torch.tensor(5.0)
    with pytest.raises(ValueError, match=r"step counts differ across parameters \(\[1, 5\]\)"):
        opt.load_state_dict(consolidated)


# Where torch.optim and one flat step part ways (zero/presence.py, zero/groups.py): torch's result, or a raise.


def test_a_step_with_no_gradient_anywhere_changes_nothing_as_torchs():
    model, reference = make_model(), make_model()
    opt, torch_opt = zero_opt(model, lr=0.05), torch.optim.AdamW(reference.parameters(), lr=0.05)
    for o in (opt, torch_opt):
        o.step()  # before any backward: torch skips every parameter, weight decay included
    assert_params_close(model, reference)
    for step in range(3):
        for m, o in ((model, opt), (reference, torch_opt)):
            o.zero_grad()
            o.step()  # zero_grad(set_to_none=True), then no backward: nothing to step again
            loss(m, step).backward()
            o.step()
    assert_params_close(model, reference)  # the step counts agree too: bias correction is at step 3 in both


def test_zero_grad_in_place_steps_a_parameter_without_a_gradient_as_torch():
    """set_to_none=False: torch steps the unused parameter with a zero gradient (its moments decay, weights decay)."""
    model, reference = make_model(), make_model()
    opt, torch_opt = zero_opt(model, lr=0.05), torch.optim.AdamW(reference.parameters(), lr=0.05)
    for step in range(4):
        for m, o in ((model, opt), (reference, torch_opt)):
            o.zero_grad(set_to_none=False)
            out = m(torch.randn(8, 5, generator=torch.Generator().manual_seed(step)))
            (m[0](torch.ones(1, 5)).sum() if step % 2 else out.sum()).backward()  # odd steps leave m[2] out
            o.step()
    assert_params_close(model, reference)


def test_a_parameter_without_a_gradient_on_any_rank_is_refused():
    model = make_model()
    opt = zero_opt(model)
    loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    model[2].requires_grad_(False)  # frozen after the optimizer was built: torch would stop stepping it
    loss(model, 1).backward()
    with pytest.raises(RuntimeError, match=r"parameter\(s\) 2 \(2, 7\), 3 \(2,\) got no gradient on any rank.*"):
        opt.step()


def test_a_second_step_without_zero_grad_is_refused():
    model = make_model()
    opt = zero_opt(model)
    loss(model, 0).backward()
    opt.step()
    loss(model, 1).backward()  # torch would step on both backwards' gradients
    with pytest.raises(RuntimeError, match=r"step\(\) again with no zero_grad\(\) since the last step"):
        opt.step()
    opt.zero_grad()
    loss(model, 1).backward()
    opt.step()  # the fix


def test_adam_without_w_decays_nothing_by_default_as_torchs():
    model, reference = make_model(), make_model()
    opt, torch_opt = zero_opt(model, lr=0.05, adamw=False), torch.optim.Adam(reference.parameters(), lr=0.05)
    assert opt.param_groups[0]["weight_decay"] == torch_opt.param_groups[0]["weight_decay"] == 0
    for step in range(3):
        for m, o in ((model, opt), (reference, torch_opt)):
            loss(m, step).backward()
            o.step()
            o.zero_grad()
    assert_params_close(model, reference)


@pytest.mark.parametrize(
    "group,message",
    [
        ({"amsgrad": True}, r"amsgrad=True in a param group: ZeroOffloadOptimizer has no amsgrad; leave it out"),
        ({"maximize": True}, r"maximize=True in a param group"),
        ({"differentiable": True}, r"differentiable=True in a param group"),
        ({"decoupled_weight_decay": False}, r"decoupled_weight_decay=False .* adamw=True; build it with adamw=False"),
    ],
)
def test_settings_of_torchs_adam_that_zero_lacks_are_refused(group, message):
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match=message):
        ZeroOffloadOptimizer([{"params": params, **group}], comm=LocalCommunicator())
    model = make_model()
    opt = zero_opt(model)
    opt.param_groups[0].update(group)  # set after construction: refused at the next step
    loss(model, 0).backward()
    with pytest.raises(ValueError, match=message):
        opt.step()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), r"decoupled_weight_decay=False .* adamw=True"),
        (lambda ps: torch.optim.AdamW(ps, amsgrad=True), r"amsgrad=True in a param group"),
        (lambda ps: torch.optim.AdamW(ps, maximize=True), r"maximize=True in a param group"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), r"saved param group 0 has no betas, eps: not a state dict of Adam"),
    ],
    ids=["Adam", "amsgrad", "maximize", "SGD"],
)
def test_torch_state_dicts_zero_cannot_follow_are_refused(make, message):
    model = make_model()
    torch_opt = make(model.parameters())
    loss(model, 0).backward()
    torch_opt.step()
    with pytest.raises(ValueError, match=message):
        zero_opt(make_model()).load_state_dict(torch_opt.state_dict())


def test_a_torch_state_dict_missing_a_parameters_entry_is_refused():
    """torch.optim makes a parameter's state at its first gradient: one that never had one has no step count."""
    model = make_model()
    torch_opt = torch.optim.AdamW(model.parameters())
    model[0](torch.ones(1, 5)).sum().backward()  # the second layer gets no gradient
    torch_opt.step()
    with pytest.raises(ValueError, match=r"no entry for parameter\(s\) \[2, 3\] .* step 1 for the others"):
        zero_opt(make_model()).load_state_dict(torch_opt.state_dict())


def test_an_empty_param_group_is_refused():
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match=r"param group 1 has no parameters; .* leave it out"):
        ZeroOffloadOptimizer([{"params": params}, {"params": []}], comm=LocalCommunicator())


def test_hyperparameters_torch_takes_as_numpy_scalars_or_tensors_step_as_floats():
    """torch.optim.AdamW steps with an lr (or betas) given as a NumPy scalar or a one-element tensor."""
    import numpy as np

    model, reference = make_model(), make_model()
    opt, torch_opt = zero_opt(model, lr=np.float32(0.02)), torch.optim.AdamW(reference.parameters(), lr=0.02)
    for step, lr in enumerate([torch.tensor(0.05), np.float64(0.01), 0.03]):
        opt.param_groups[0]["lr"], torch_opt.param_groups[0]["lr"] = lr, float(lr)
        opt.param_groups[0]["betas"] = (np.float32(0.9), torch.tensor(0.999))
        for m, o in ((model, opt), (reference, torch_opt)):
            loss(m, step).backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(list(model.parameters()), list(reference.parameters()), rtol=1e-5, atol=1e-7)
    opt.param_groups[0]["lr"] = torch.tensor(-1.0)
    loss(model, 3).backward()
    with pytest.raises(ValueError, match=r"lr must be a float >= 0, got tensor\(-1\.\)"):
        opt.step()


def test_torchs_switches_are_taken_or_refused_at_construction():
    """foreach and fused are speed options (the CPU step is fused); the switches that change the math raise."""
    zero_opt(make_model(), foreach=False, fused=True)
    for name in ("amsgrad", "maximize", "differentiable", "capturable"):
        with pytest.raises(ValueError, match=rf"^{name}=True: ZeroOffloadOptimizer has no {name}; leave it out$"):
            zero_opt(make_model(), **{name: True})


def hooked(opt: torch.optim.Optimizer) -> list[str]:
    """torch.optim's four state-dict hooks on `opt`, each noting its call; the save post-hook adds a key."""
    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (seen.append("save post"), {**sd, "mark": 1})[1])
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(f"load pre {sd.get('mark')}"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load post"))
    return seen


def test_state_dict_hooks_run_as_torchs():
    """torch.optim's four state-dict hooks, in torch's order, with what they return used."""
    calls = []
    for model, opt in ((m := make_model(), torch.optim.AdamW(m.parameters())), (m := make_model(), zero_opt(m))):
        seen = hooked(opt)
        loss(model, 0).backward()
        opt.step()
        saved = opt.state_dict()
        assert saved["mark"] == 1
        opt.load_state_dict(saved)
        calls.append(seen)
    assert calls[0] == calls[1] == ["save pre", "save post", "load pre 1", "load post"]


def test_clip_grad_norm_raises_on_a_non_finite_norm_when_asked_as_torchs():
    model = make_model()
    opt = zero_opt(model)
    (model(torch.full((2, 5), float("inf"))).sum()).backward()
    with pytest.raises(RuntimeError, match=r"The total norm of order 2.0 for gradients from `parameters` is non-fin"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)


def test_gradients_between_clip_and_step_are_none_and_a_backward_there_raises():
    """clip_grad_norm_ averages the gradients into shards: `.grad` is None until step(), so no script reads or
    changes what is now scratch; a backward in between would be lost, so step() refuses it."""
    model, reference = make_model(), make_model()
    opt, torch_opt = zero_opt(model, lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(3):
        loss(model, step).backward()
        opt.clip_grad_norm_(0.05)
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        assert all(p.grad is not None for p in model.parameters())  # the flat buffer's views, zeroed
        opt.zero_grad()
        loss(reference, step).backward()
        nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        torch_opt.step()
        torch_opt.zero_grad()
    assert_params_close(model, reference)
    loss(model, 5).backward()
    opt.clip_grad_norm_(1e9)
    loss(model, 6).backward()
    with pytest.raises(RuntimeError, match=r"a backward ran after opt\.clip_grad_norm_\(\) and before step\(\)"):
        opt.step()


def test_a_grad_scaler_that_clips_must_unscale_first():
    """torch's AMP recipe unscales before clipping; clipping the scaled gradients would clip at the wrong norm."""
    model = make_model()
    opt, scaler = zero_opt(model), torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(loss(model, 0)).backward()
    opt.clip_grad_norm_(1.0)
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match=r"call scaler\.unscale_\(opt\) before opt"):
        scaler.step(opt)
