"""ZeroOffloadOptimizer at whatever world size launched us, against single-process torch.optim.AdamW.

Every rank trains on its equal slice of each global batch; the reference trains on the whole batch in this same
process, starting from the weights rank 0 starts from (the other ranks start elsewhere on purpose: the
optimizer's broadcast must fix that).
"""

from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch
from torch import nn

from distrib.comm.local import LocalCommunicator
from distrib.zero import ZeroOffloadOptimizer

pytestmark = pytest.mark.mpi  # pytest-mpi's mark: `mpiexec -n N python -m pytest --with-mpi tests/ranks`
GLOBAL_BATCH = 24  # divides by 1, 2, 3 and 4 ranks, and each rank's slice by 2 micro-batches
STEPS = 20
LR = 1e-2


def make_model(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """5 -> 7 -> 2: 58 parameters, a count that divides by neither 3 nor 4, so the last shard is padded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)


def groups(model: nn.Module) -> list[dict]:
    """Weights decay, biases do not: two param groups whose boundary falls inside some rank's shard."""
    params = list(model.parameters())
    return [{"params": params[0::2]}, {"params": params[1::2], "weight_decay": 0.0}]


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 5, generator=gen).to(dtype), torch.randn(GLOBAL_BATCH, 2, generator=gen).to(dtype)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int = 1) -> None:
    """Mean-squared error of the batch, summed from `micro` equal micro-batches accumulated in .grad."""
    for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
        (nn.functional.mse_loss(model(xs), ys) / micro).backward()


def mine(comm, t: torch.Tensor) -> torch.Tensor:
    """This rank's equal slice of a global batch."""
    part = GLOBAL_BATCH // comm.size
    return t[comm.rank * part : (comm.rank + 1) * part]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def flat_params(model: nn.Module) -> torch.Tensor:
    """The parameters as one differentiable vector."""
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def assert_same_everywhere(comm, model: nn.Module) -> None:
    """The allgather leaves every rank with the very same bits."""
    ours = flat(model)
    theirs = comm.broadcast(ours.clone(), 0)
    assert torch.equal(ours, theirs)


def train_reference(steps: range, micro: int = 1, clip: float | None = None, delayed: bool = False):
    """torch AdamW on the global batch; delayed: each gradient taken at the weights before the last update."""
    model = make_model(1)
    opt = torch.optim.AdamW(groups(model), lr=LR)
    lagging = copy.deepcopy(model)  # the weights a delayed run computes with
    norms = []
    for step in steps:
        backward(lagging if delayed else model, *batch(step), micro)
        if delayed:
            for p, q in zip(model.parameters(), lagging.parameters()):
                p.grad, q.grad = q.grad, None
            lagging.load_state_dict(model.state_dict())
        if clip is not None:
            norms.append(nn.utils.clip_grad_norm_(model.parameters(), clip))
        opt.step()
        opt.zero_grad()
    return model, opt, norms


@functools.lru_cache  # the same for every algorithm: trained once
def reference_run(micro: int, clip: float | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The weights and gradient norms of train_reference over STEPS."""
    model, _, norms = train_reference(range(STEPS), micro, clip)
    return flat(model), norms


def train_zero(comm, model, opt, steps: range, micro: int = 1, clip: float | None = None) -> list[torch.Tensor]:
    norms = []
    for step in steps:
        x, y = batch(step)
        backward(model, mine(comm, x), mine(comm, y), micro)
        if clip is not None:
            norms.append(opt.clip_grad_norm_(clip))
        opt.step()
        opt.zero_grad()
    return norms


def zero(comm, seed: int | None = None, **kwargs) -> tuple[nn.Module, ZeroOffloadOptimizer]:
    model = make_model(1 + 100 * comm.rank if seed is None else seed)
    return model, ZeroOffloadOptimizer(groups(model), lr=LR, comm=comm, **kwargs)


@pytest.mark.parametrize("algorithm", ["naive", "ring", "native", "auto"])
@pytest.mark.parametrize("micro,clip", [(1, None), (2, 0.05)], ids=["plain", "accumulate+clip"])
def test_training_matches_torch_adamw_on_the_global_batch(comm, algorithm, micro, clip):
    model, opt = zero(comm, algorithm=algorithm)
    norms = train_zero(comm, model, opt, range(STEPS), micro, clip)
    reference, ref_norms = reference_run(micro, clip)
    torch.testing.assert_close(flat(model), reference, rtol=1e-5, atol=1e-7)
    if clip is not None:  # the global norm, summed over every rank's shard
        torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms), rtol=1e-5, atol=0)
        assert min(ref_norms) > clip  # the clipping did act
    assert_same_everywhere(comm, model)


def test_delayed_update_is_the_plain_run_one_step_late(comm):
    """A gradient that ignores the weights: the delayed run's weights after step t are the plain run's after t-1."""
    gen = torch.Generator().manual_seed(comm.rank)
    coefs = [torch.randn(58, generator=gen) for _ in range(6)]  # per rank and step, so averaging matters
    runs = {}
    for delay in (False, True):
        model, opt = zero(comm, delay_update=delay)
        history = [flat(model)]
        for c in coefs:
            (flat_params(model) * c).sum().backward()
            opt.step()
            opt.zero_grad()
            history.append(flat(model))
        opt.flush()
        runs[delay] = history + [flat(model)]
    plain, delayed = runs[False], runs[True]
    assert torch.equal(delayed[1], plain[0]) and not torch.equal(plain[1], plain[0])
    for t in range(2, len(coefs) + 1):
        assert torch.equal(delayed[t], plain[t - 1]), t
    assert torch.equal(delayed[-1], plain[-2])  # flush() applies the last update


@pytest.mark.parametrize("algorithm", ["ring", "native"])
def test_delayed_update_matches_stale_gradient_adamw(comm, algorithm):
    model, opt = zero(comm, delay_update=True, algorithm=algorithm)
    train_zero(comm, model, opt, range(STEPS))
    lagging, _, _ = train_reference(range(STEPS - 1), delayed=True)  # the model lags the master by one update
    torch.testing.assert_close(flat(model), flat(lagging), rtol=1e-5, atol=1e-7)
    opt.flush()
    reference, _, _ = train_reference(range(STEPS), delayed=True)
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-5, atol=1e-7)
    assert_same_everywhere(comm, model)


def test_each_rank_holds_a_cpu_shard_of_the_state_and_nothing_full_size(comm):
    """1192 parameters (not a multiple of 3): state for ceil(1192 / N) of them per rank, no full-size copies."""
    gc.collect()
    before = {t.untyped_storage().data_ptr() for t in big_tensors(1192)}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 29), nn.Linear(29, 3))
    opt = ZeroOffloadOptimizer(model.parameters(), comm=comm)
    x = torch.randn(4, 37)
    model(x).sum().backward()
    opt.step()
    shard = -(-1192 // comm.size)
    state = opt.state_dict()["state"]
    for name, t in state.items():
        assert t.shape == (shard,) and t.device.type == "cpu" and t.dtype == torch.float32, name
    assert opt.state_nbytes() == 2 * 4 * shard  # two moments; fp32 CPU parameters are their own master
    gc.collect()
    new = {t.untyped_storage().data_ptr() for t in big_tensors(1192)} - before
    buffers = {t.untyped_storage().data_ptr() for t in (opt._flat, opt._flat_grad)}
    moments = {t.untyped_storage().data_ptr() for t in state.values()} if comm.size == 1 else set()
    assert new == buffers | moments  # parameters and gradients in one flat buffer each; moments full-size at N=1 only
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == {opt._flat.untyped_storage().data_ptr()}


def big_tensors(numel: int) -> list[torch.Tensor]:
    """Live tensors whose storage could hold `numel` float32 values."""
    return [
        obj
        for obj in gc.get_objects()
        if issubclass(type(obj), torch.Tensor)
        and obj.device.type != "meta"
        and obj.untyped_storage().nbytes() >= 4 * numel
    ]


@pytest.mark.parametrize("delay", [False, True], ids=["plain", "delayed"])
def test_sharded_state_dict_resumes_exactly(comm, delay):
    model, opt = zero(comm, delay_update=delay)
    train_zero(comm, model, opt, range(4))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_zero(comm, model, opt, range(4, 8))
    opt.flush()
    resumed, resumed_opt = zero(comm, seed=50 + comm.rank, delay_update=delay)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    train_zero(comm, resumed, resumed_opt, range(4, 8))
    resumed_opt.flush()
    assert torch.equal(flat(resumed), flat(model))


def test_consolidated_state_moves_between_world_sizes_and_torch_adamw(comm):
    """ZeRO at N -> torch AdamW -> ZeRO at 1 -> ZeRO at N, 4 steps each, ends where 16 steps of AdamW do."""
    model, opt = zero(comm)
    train_zero(comm, model, opt, range(4))
    consolidated = comm.broadcast_object(opt.consolidated_state_dict())
    _, ref_opt, _ = train_reference(range(4))
    ref_state = ref_opt.state_dict()["state"]
    for i in range(4):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(consolidated["state"][i][key], ref_state[i][key], rtol=1e-5, atol=1e-9)

    plain = make_model(7)  # torch AdamW, in this process
    plain.load_state_dict(model.state_dict())
    adamw = torch.optim.AdamW(groups(plain), lr=0.5)  # the loaded groups bring lr back
    adamw.load_state_dict(consolidated)
    for step in range(4, 8):
        backward(plain, *batch(step))
        adamw.step()
        adamw.zero_grad()

    alone = make_model(8)  # ZeRO in a world of one
    alone.load_state_dict(plain.state_dict())
    alone_opt = ZeroOffloadOptimizer(groups(alone), comm=LocalCommunicator())
    alone_opt.load_state_dict(copy.deepcopy(adamw.state_dict()))
    for step in range(8, 12):
        backward(alone, *batch(step))
        alone_opt.step()
        alone_opt.zero_grad()

    again, again_opt = zero(comm, seed=9)
    again.load_state_dict(alone.state_dict())
    again_opt.load_state_dict(alone_opt.consolidated_state_dict())
    train_zero(comm, again, again_opt, range(12, 16))
    reference, _, _ = train_reference(range(16))
    torch.testing.assert_close(flat(again), flat(reference), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model_follows_the_fp32_master_reference(comm, dtype):
    """Half-precision weights and gradients, fp32 master and moments: the reference, cast to the model's dtype."""
    lr = 1e-3  # updates near one ulp of the weights: what a master copy is for
    model = make_model(1 + 100 * comm.rank, dtype)
    opt = ZeroOffloadOptimizer(model.parameters(), lr=lr, comm=comm)
    reference = make_model(1, dtype)
    master = [p.detach().float().requires_grad_() for p in reference.parameters()]
    ref_opt = torch.optim.AdamW(master, lr=lr)
    no_master = make_model(1, dtype)  # AdamW straight on the half-precision weights: what the test must tell apart
    no_master_opt = torch.optim.AdamW(no_master.parameters(), lr=lr)
    for step in range(STEPS):
        x, y = batch(step, dtype)
        backward(model, mine(comm, x), mine(comm, y))
        opt.step()
        opt.zero_grad()
        backward(reference, x, y)
        for m, p in zip(master, reference.parameters()):
            m.grad, p.grad = p.grad.float(), None
        ref_opt.step()
        with torch.no_grad():
            for m, p in zip(master, reference.parameters()):
                p.copy_(m)
        backward(no_master, x, y)
        no_master_opt.step()
        no_master_opt.zero_grad()
    assert all(p.dtype == dtype for p in model.parameters())
    error = (flat(model) - flat(reference)).abs().max().item()
    no_master_error = (flat(no_master) - flat(reference)).abs().max().item()
    tolerance = torch.finfo(dtype).eps / 2  # two ulps of a weight just under 0.5; the weights stay below it
    assert flat(reference).abs().max() < 0.5
    assert error <= tolerance, (error, tolerance)  # bf16 at 4 ranks: one ulp, from averaging bf16 gradients
    assert not no_master_error <= tolerance, (no_master_error, tolerance)  # far off, or NaN (fp16: eps underflows)


def test_a_parameter_with_a_gradient_on_one_rank_only_is_stepped_and_one_with_none_anywhere_refused(comm):
    """Whether a parameter has a gradient is decided over all ranks: torch's rule for the averaged gradient."""
    model = make_model(1)
    extra = nn.Parameter(torch.ones(3))
    opt = ZeroOffloadOptimizer([*model.parameters(), extra], lr=LR, comm=comm)
    reference, ref_extra = make_model(1), nn.Parameter(torch.ones(3))
    ref_opt = torch.optim.AdamW([*reference.parameters(), ref_extra], lr=LR)
    for step in range(3):
        x, y = batch(step)
        backward(model, mine(comm, x), mine(comm, y))
        if comm.rank == comm.size - 1:  # the last rank alone uses it: its gradient averages to 1/size
            (extra * torch.arange(3.0)).sum().backward()
        opt.step()
        opt.zero_grad()
        backward(reference, x, y)
        (ref_extra * torch.arange(3.0) / comm.size).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(extra.detach(), ref_extra.detach(), rtol=1e-5, atol=1e-6)
    x, y = batch(3)
    backward(model, mine(comm, x), mine(comm, y))  # extra gets no gradient on any rank now
    with pytest.raises(RuntimeError, match=r"parameter\(s\) 4 \(3,\) got no gradient on any rank"):
        opt.step()
    assert comm.allreduce(torch.ones(1))[0] == comm.size  # every rank raised at the same call: none hangs


def test_a_grad_scaler_skips_on_every_rank_when_one_rank_overflows(comm):
    """An inf in one rank's gradients: every rank skips the step and halves its scale, as DDP's averaging makes
    torch's scalers do; single-process AdamW with the scaler on the global batch is the reference."""
    model, reference = make_model(1), make_model(1)
    opt, ref_opt = (
        ZeroOffloadOptimizer(model.parameters(), lr=LR, comm=comm),
        torch.optim.AdamW(reference.parameters(), lr=LR),
    )
    scaler, ref_scaler = (torch.amp.GradScaler("cpu", init_scale=4.0) for _ in range(2))
    for step in range(4):
        x, y = batch(step)
        if step == 1:
            x[GLOBAL_BATCH // comm.size - 1, 0] = float("inf")  # in the last row of rank 0's slice only
        for m, o, s, xs, ys in (
            (model, opt, scaler, mine(comm, x), mine(comm, y)),
            (reference, ref_opt, ref_scaler, x, y),
        ):
            s.scale(nn.functional.mse_loss(m(xs), ys)).backward()
            s.step(o)
            s.update()
            o.zero_grad()
        assert scaler.get_scale() == ref_scaler.get_scale() == (4.0 if step == 0 else 2.0)
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-5, atol=1e-6)
    assert_same_everywhere(comm, model)


class Projected(nn.Module):
    """The test model after a fixed random projection held in a buffer: a buffer the gradients depend on, which
    each forward updates from its batch's first row, as BatchNorm's running stats follow each rank's batch."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.layers = make_model(seed)
        self.register_buffer("proj", torch.randn(5, 5, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x @ self.proj)
        with torch.no_grad():
            self.proj.mul_(1 + 0.1 * x[0].tanh())  # rank 0's first row is the global batch's
        return out


def test_buffers_given_are_rank_zeros_as_under_ddp(comm):
    """buffers=model.buffers(): each rank starts from rank 0's buffers and holds them after every step, so each
    forward sees rank 0's, as DDP's broadcast_buffers has it; here every rank's buffer starts different."""
    model, reference = Projected(1 + comm.rank), Projected(1)
    opt = ZeroOffloadOptimizer(model.parameters(), lr=LR, comm=comm, buffers=model.buffers())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    for step in range(3):
        x, y = batch(step)
        for m, o, xs, ys in ((model, opt, mine(comm, x), mine(comm, y)), (reference, ref_opt, x, y)):
            nn.functional.mse_loss(m(xs), ys).backward()
            o.step()
            o.zero_grad()
        assert torch.equal(model.proj, reference.proj)
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-5, atol=1e-6)
