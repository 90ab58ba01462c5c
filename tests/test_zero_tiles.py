"""ZeRO-Offload's tiled step on CPU tensors (no GPU: the copies run inline, the schedule is the same): the tiles cover
every element once and in order, downloads run ahead of the CPU step, and any tiling gives the untiled numbers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import distrib
from distrib.comm.local import LocalCommunicator
from distrib.zero import ZeroOffloadOptimizer
from distrib.zero.cpu_adam import adam_step_
from distrib.zero.tiles import Offload, pipeline, spans

HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


@pytest.mark.parametrize("numel", [0, 1, 63, 64, 65, 300])
@pytest.mark.parametrize("tile", [64, 128, 1024, None])
@pytest.mark.parametrize("starts", [(), (50,), (10, 11, 200), (0, 300)])
def test_tiles_cover_every_element_once_in_order(numel, tile, starts):
    tiles = spans(numel, tile, starts)
    covered = [i for t in tiles for i in range(t.start, t.stop)]
    assert covered == list(range(numel))  # once each, in order, nothing past the end
    assert all(0 < t.stop - t.start <= (tile or numel) for t in tiles)
    if tile is None:
        assert len(tiles) == (numel > 0)
        return
    cuts = sorted({0, *(s for s in starts if s < numel)})
    for t in tiles:  # each tile starts a whole number of tiles after the last cut (a param group's start)
        assert (t.start - max(c for c in cuts if c <= t.start)) % tile == 0
    assert {s for s in starts if s < numel} <= {t.start for t in tiles}


@pytest.mark.parametrize("tile", [0, -64, True, 64.0, 100])
def test_a_bad_tile_size_is_refused(tile):
    with pytest.raises(ValueError, match="tile_numel must be a positive multiple of 64 elements, or None"):
        spans(10, tile)
    with pytest.raises(ValueError, match="tile_numel must be a positive multiple of 64"):
        ZeroOffloadOptimizer(nn.Linear(2, 2).parameters(), comm=LocalCommunicator(), tile_numel=tile)


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_the_next_download_is_issued_before_the_cpu_step_and_each_upload_right_after_it(count):
    tiles = spans(count * 64, 64)
    log = []
    pipeline(
        tiles,
        fetch=lambda t: log.append(("fetch", t.start // 64)) or t.start // 64,
        wait=lambda k: log.append(("wait", k)),
        update=lambda t: log.append(("update", t.start // 64)),
        store=lambda t: log.append(("store", t.start // 64)),
    )
    expected = [("fetch", 0)] if count else []
    for k in range(count):
        expected += [("fetch", k + 1)] if k + 1 < count else []
        expected += [("wait", k), ("update", k), ("store", k)]
    assert log == expected


def reference(master: torch.Tensor, grad: torch.Tensor, steps: int) -> torch.Tensor:
    """The untiled fused step, `steps` times on copies."""
    master, moments = master.clone(), (torch.zeros_like(master), torch.zeros_like(master))
    beta1, beta2 = HYPER["betas"]
    for step in range(1, steps + 1):
        adam_step_(
            master, grad, *moments, step=step, lr=HYPER["lr"], beta1=beta1, beta2=beta2, eps=HYPER["eps"],
            weight_decay=HYPER["weight_decay"], adamw=True,
        )  # fmt: skip
    return master


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [64, 128, None])
def test_offload_in_tiles_equals_the_untiled_step(dtype, tile):
    gen = torch.Generator().manual_seed(0)
    start, grad = torch.randn(301, generator=gen), torch.randn(301, generator=gen).to(dtype)
    own = start.to(dtype, copy=True)
    offload, master = Offload(own, tile), own.float().clone()
    moments = torch.zeros(301), torch.zeros(301)
    beta1, beta2 = HYPER["betas"]
    for step in (1, 2, 3):

        def update(t: slice, step=step) -> None:
            adam_step_(
                master[t], offload.grad[t], moments[0][t], moments[1][t], step=step, lr=HYPER["lr"], beta1=beta1,
                beta2=beta2, eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], adamw=True,
            )  # fmt: skip

        offload.step(grad, master, update)
    expected = reference(start.to(dtype).float(), grad.float(), 3)
    assert torch.equal(master, expected)  # bit for bit
    assert torch.equal(own, expected.to(dtype))  # the parameters: the master rounded to their dtype


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3)).to(dtype)  # 240 + 120 weights, 43 biases


def train(dtype: torch.dtype, tile: int | None, delay: bool, steps: int = 4) -> list[torch.Tensor]:
    net = model(dtype)
    params = list(net.parameters())
    groups = [{"params": params[0::2]}, {"params": params[1::2], "weight_decay": 0.0}]  # a boundary inside a tile
    opt = ZeroOffloadOptimizer(groups, lr=1e-2, comm=LocalCommunicator(), delay_update=delay, tile_numel=tile)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("dtype,delay", [(torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)])
def test_the_optimizer_gives_the_same_weights_with_any_tiling(dtype, delay):
    whole = train(dtype, None, delay)
    for tile in (64, 128):
        for got, expected in zip(train(dtype, tile, delay), whole):
            assert torch.equal(got, expected), tile


def test_the_trace_shows_the_copies(tmp_path):
    net = model(torch.bfloat16)
    comm = LocalCommunicator()
    opt = ZeroOffloadOptimizer(net.parameters(), comm=comm, tile_numel=192)  # 403 parameters: 3 tiles
    net(torch.randn(2, 6, dtype=torch.bfloat16)).sum().backward()
    with distrib.trace(tmp_path / "trace.json", comm):
        opt.step()
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    copies = [(e["name"], e["args"]["tile"]) for e in events if e.get("cat") == "copy"]
    assert copies == [
        ("gradient to host", 0), ("gradient to host", 1), ("parameters to device", 0), ("gradient to host", 2),
        ("parameters to device", 1), ("parameters to device", 2),
    ]  # fmt: skip
