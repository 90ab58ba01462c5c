"""The GPU path where a GPU is: collectives on CUDA tensors (nccl at 1 rank, mpi and gloo at 2 ranks sharing it), DDP
against torch's DDP, ZeRO-Offload against torch.optim.AdamW, distrib.train learning on the GPU, and the pieces
(pinned minibatches, the copy stream, GPU-timed stages).

Every test carries the `cuda` mark (`pytest -m cuda` selects them) and skips without a GPU, saying so.
DISTRIB_GPU_DRY_RUN=1 runs the launcher tests on the CPU instead (device cpu, gloo for nccl), which proves their
control flow where no GPU is; DISTRIB_GPU_RESULTS=DIR keeps each check's JSON there (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.launching import MPIEXEC, ROOT, run

GPU = torch.cuda.is_available()
DRY = os.environ.get("DISTRIB_GPU_DRY_RUN") == "1" and not GPU
DEVICE, NCCL = ("cpu", "gloo") if DRY else ("cuda", "nccl")
RESULTS = Path(os.environ["DISTRIB_GPU_RESULTS"]) if os.environ.get("DISTRIB_GPU_RESULTS") else None
CHECK = ["-m", "benchmarks.gpu_check"]
# Keep what the caller put on the path (gpu_check.sh: wheels installed for a machine that lacks them).
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

pytestmark = pytest.mark.cuda
on_device = pytest.mark.skipif(
    not (GPU or DRY), reason="no CUDA GPU on this machine (DISTRIB_GPU_DRY_RUN=1 runs these on the CPU)"
)
on_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU on this machine")


def launch(launcher: str, n: int, args: list[str]) -> list[str]:
    if launcher == "torchrun":  # as a module: a torchrun script need not be on PATH
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    return [MPIEXEC, "-n", str(n), sys.executable, *args]


def check(tmp_path: Path, launcher: str, backend: str, n: int, section: str, *extra: str) -> dict:
    """Run one section of benchmarks/gpu_check.py on n ranks; it must pass; its JSON, kept when asked."""
    out = (RESULTS or tmp_path) / f"{section}-{backend}-{n}rank{'s' * (n > 1)}.json"
    cmd = launch(launcher, n, [*CHECK, section, "--device", DEVICE, "--backend", backend, "--json", str(out), *extra])
    result = run(cmd, timeout=150, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@on_device
@pytest.mark.parametrize("launcher,backend,n", [("torchrun", NCCL, 1), ("mpiexec", "mpi", 2), ("mpiexec", "gloo", 2)])
def test_collectives_on_the_device_equal_a_float64_reference(tmp_path, launcher, backend, n):
    found = check(tmp_path, launcher, backend, n, "collectives")
    assert found["ranks"] == n and found["device"].startswith(DEVICE) and not found["failures"], found
    assert found["checks_per_rank"] >= 120  # naive, ring, native (+ shm on mpi) x 6 dtypes x 7 calls, broadcasts
    assert set(found["refused"]) == (set() if backend == "mpi" else {"shm"}), found["refused"]


@on_device
@pytest.mark.parametrize("launcher,backend,n", [("torchrun", NCCL, 1), ("mpiexec", "mpi", 2)])
def test_ddp_on_the_device_equals_torch_ddp(tmp_path, launcher, backend, n):
    found = check(tmp_path, launcher, backend, n, "ddp")
    assert found["ok"] and found["max_abs_diff_vs_torch_ddp"] <= 1e-5 and found["outputs_on_device"], found


@on_device
@pytest.mark.parametrize("launcher,backend,n", [("torchrun", NCCL, 1), ("mpiexec", "mpi", 2)])
def test_zero_offload_with_the_model_on_the_device_equals_adamw(tmp_path, launcher, backend, n):
    found = check(tmp_path, launcher, backend, n, "zero")
    assert found["parity"]["ok"], found["parity"]


@on_device
@pytest.mark.parametrize("launcher,backend,n", [("torchrun", NCCL, 1), ("mpiexec", "mpi", 2)])
def test_distrib_train_learns_on_the_device(tmp_path, launcher, backend, n):
    run_dir = tmp_path / "run"
    argv = ["-m", "distrib.train", "--device", DEVICE, "--backend", backend, "--epochs", "2", "--no-progress"]
    result = run(launch(launcher, n, [*argv, "--out", str(run_dir)]), timeout=150, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(result.stdout)
    out = (RESULTS or tmp_path) / f"train-{backend}-{n}rank{'s' * (n > 1)}.json"
    learned = run([sys.executable, *CHECK, "learned", str(run_dir), "--device", DEVICE, "--json", str(out)], 60, ENV)
    assert learned.returncode == 0, learned.stdout[-3000:]  # accuracy >= 0.9 (chance 0.125), and on the device
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in weights.values())  # saved to load anywhere


# In one process, on the GPU itself.


@on_gpu
def test_auto_gives_this_rank_its_gpu():
    from distrib.device import choose
    from distrib.env import World

    assert choose("auto", World(0, 1, 0, 1, "none")) == torch.device("cuda", 0)
    assert choose("cuda", World(1, 2, 1, 2, "mpich"), "mpi").type == "cuda"


@on_gpu
def test_minibatches_are_held_on_the_gpu_or_copied_from_pinned_memory(monkeypatch):
    from distrib import device as dev

    data = (torch.randn(1000, 8), torch.arange(1000))
    index = torch.randperm(1000)[:100]
    feeder = dev.Feeder(torch.device("cuda", 0))
    held = feeder.hold(data)
    assert all(t.is_cuda for t in held) and feeder.hold(data) is held  # moved once, not every epoch
    got = feeder.rows(held, index)
    assert torch.equal(got[0].cpu(), data[0][index]) and torch.equal(got[1].cpu(), data[1][index])
    monkeypatch.setattr(dev, "HOLD_FRACTION", 0.0)  # as if it did not fit
    feeder = dev.Feeder(torch.device("cuda", 0))
    assert feeder.hold(data) is data
    got = feeder.rows(data, index)  # gathered into pinned memory, copied without blocking
    assert got[0].is_cuda and torch.equal(got[0].cpu(), data[0][index]) and torch.equal(got[1].cpu(), data[1][index])


@on_gpu
def test_tiles_on_the_copy_stream_give_the_cpu_bits_and_leave_no_state_on_the_gpu(tmp_path):
    import distrib
    from distrib.comm.local import LocalCommunicator
    from distrib.zero import ZeroOffloadOptimizer

    torch.manual_seed(0)
    on_gpu = nn.Sequential(nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 8)).to("cuda", torch.bfloat16)
    on_cpu = copy.deepcopy(on_gpu).cpu()
    on_gpu(torch.ones(2, 1024, device="cuda", dtype=torch.bfloat16)).sum().backward()  # cuBLAS's workspace, once
    on_gpu.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated()
    gpu_opt = ZeroOffloadOptimizer(on_gpu.parameters(), comm=LocalCommunicator(), tile_numel=1 << 16)  # 17 tiles
    built = torch.cuda.memory_allocated()
    assert built - before <= 2 * gpu_opt.layout.padded * 2  # the flat parameters and gradients, nothing else
    cpu_opt = ZeroOffloadOptimizer(on_cpu.parameters(), comm=LocalCommunicator(), tile_numel=None)
    for step in range(3):
        x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(step)).to("cuda", torch.bfloat16)
        on_gpu(x).float().pow(2).mean().backward()
        for p, q in zip(on_gpu.parameters(), on_cpu.parameters()):
            q.grad.copy_(p.grad)  # the same gradient: the steps must then agree to the bit
        with distrib.trace(tmp_path / "trace.json", gpu_opt.comm) if step == 2 else contextlib.nullcontext():
            gpu_opt.step()
        cpu_opt.step()
        gpu_opt.zero_grad()
        cpu_opt.zero_grad()
        assert all(torch.equal(p.cpu(), q) for p, q in zip(on_gpu.parameters(), on_cpu.parameters())), step
    # Moments and masters on the CPU: 24 MB of state, none of it on the GPU; the steps allocated nothing there.
    assert gpu_opt._exp_avg.device.type == "cpu" and gpu_opt._master.is_pinned()
    assert torch.cuda.memory_allocated() - built < gpu_opt.state_nbytes() / 100
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    copies = [e for e in events if e.get("cat") == "copy"]
    assert len(copies) == 2 * len(gpu_opt._offload.tiles), len(copies)
    assert all(e["tid"] == "cuda:0 copy stream" and e["dur"] >= 0 for e in copies)


@on_gpu
def test_a_stage_on_the_gpu_lasts_as_long_as_its_kernels():
    from distrib.comm.local import LocalCommunicator
    from distrib.steps import Clock

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(int(2e8))  # spins 2e8 GPU cycles, about 0.1 s, and returns to the host at once
    end.record()
    end.synchronize()
    kernel = start.elapsed_time(end) / 1e3
    clock = Clock(LocalCommunicator(), torch.device("cuda", 0))
    with clock("forward"):
        torch.cuda._sleep(int(2e8))
    assert kernel > 0.01 and clock.seconds["forward"] >= 0.9 * kernel, (kernel, clock.seconds)
