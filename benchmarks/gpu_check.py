"""The GPU path checked on one machine: what was found, collectives, DDP, ZeRO-Offload, and a training run's result.

Run by benchmarks/gpu_check.sh; each section also runs alone, under a launcher where it needs ranks:

    python -m benchmarks.gpu_check env --json env.json
    torchrun --standalone --nproc-per-node 1 -m benchmarks.gpu_check collectives --device cuda --backend nccl
    mpiexec -n 2 python -m benchmarks.gpu_check ddp --device cuda --backend mpi --json ddp.json
    torchrun --standalone --nproc-per-node 1 -m benchmarks.gpu_check zero --device cuda --params 1e9 --json zero.json
    python -m benchmarks.gpu_check learned RUN_DIR --device cuda --min-accuracy 0.9

Every check compares with an independent reference (float64 numpy sums, torch's DDP, torch.optim.AdamW), writes
what it saw as JSON on rank 0, and exits 1 when something is off. `--device cpu` runs the same code on the CPU
(gpu_check.sh's dry run), so its control flow is proven where no GPU is.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
HALF = (torch.float16, torch.bfloat16)


def stamp() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write(path: Path | None, result: dict) -> None:
    """`result` as JSON into `path`, or on stdout without one."""
    if path is None:
        print(json.dumps(result, indent=1), flush=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def setup(device: str, backend: str | None):
    """The communicator and this rank's device, as distrib.train chooses them."""
    import distrib
    from distrib.device import choose
    from distrib.env import read_world
    from distrib.process import default_backend

    world = read_world()
    where = choose(device, world, backend)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    comm = distrib.init_process_group(backend or default_backend(world, where), timeout=120)
    return comm, where


def env(args: argparse.Namespace) -> int:
    """Which torch, CUDA, NCCL, GPU and MPI this machine has."""
    found = {"date": stamp(), "python": platform.python_version(), "torch": torch.__version__}
    found |= {"cuda": torch.version.cuda, "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if found["gpus"]:
        found["gpu"] = torch.cuda.get_device_name(0)
        found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    try:
        from mpi4py import MPI

        found["mpi4py"] = __import__("mpi4py").__version__
        found["mpi"] = " ".join(MPI.Get_library_version().split()[:3])
        query = getattr(MPI, "Query_cuda_support", None)
        found["mpi_cuda_aware"] = bool(query and query())
    except Exception as error:  # no MPI library: say so, the MPI checks will fail on their own
        found["mpi"] = f"unavailable: {type(error).__name__}: {error}"
    write(args.json, found)
    return 0


def rank_tensor(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + numel)
    if dtype.is_floating_point:
        return (torch.randn(numel, generator=gen, dtype=torch.float64) * 4).to(dtype)
    return torch.randint(-100, 100, (numel,), generator=gen, dtype=dtype)


def close(got: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, size: int) -> bool:
    got = got.double().cpu().numpy()
    if dtype in HALF:
        eps = 2**-8 if dtype == torch.bfloat16 else 2**-11
        return bool(np.allclose(got, expected, rtol=4 * size * eps, atol=16 * size * eps))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    return bool(np.allclose(got, expected, rtol=tol, atol=tol))


def collectives(args: argparse.Namespace) -> int:
    """Every collective, algorithm and dtype on tensors of the device, against float64 numpy: the result stays there."""
    import distrib

    comm, device = setup(args.device, args.backend)
    n, r = comm.size, comm.rank
    checks, failures, refused = 0, [], {}

    def check(what: str, ok: bool) -> None:
        nonlocal checks
        checks += 1
        if not ok:
            failures.append(what)

    for algorithm in distrib.ALGORITHMS:
        try:
            comm.check_algorithm(algorithm)
        except ValueError as error:
            refused[algorithm] = str(error)  # one line, e.g. shm on nccl
            continue
        for dtype in DTYPES:
            inputs = {k: np.stack([rank_tensor(q, k, dtype).double().numpy() for q in range(n)]) for k in (1, 1001)}
            ops = [("sum", 1), ("sum", 1001), ("max", 1001), ("min", 1001)] + [("avg", 1001)] * dtype.is_floating_point
            for op, numel in ops:
                t = rank_tensor(r, numel, dtype).to(device)
                comm.allreduce(t, op=op, algorithm=algorithm)
                expected = getattr(inputs[numel], "mean" if op == "avg" else op)(0)
                check(
                    f"{algorithm} allreduce {op} {dtype} {numel}", t.device == device and close(t, expected, dtype, n)
                )
            t = rank_tensor(r, 1001 * n, dtype).to(device)
            part = comm.reduce_scatter(t, algorithm=algorithm)
            whole = np.stack([rank_tensor(q, 1001 * n, dtype).double().numpy() for q in range(n)]).sum(0)
            ok = part.device == device and close(part, whole[r * 1001 : (r + 1) * 1001], dtype, n)
            check(f"{algorithm} reduce_scatter {dtype}", ok)
            out = comm.allgather(rank_tensor(r, 1001, dtype).to(device), algorithm=algorithm)
            expected = np.concatenate([rank_tensor(q, 1001, dtype).double().numpy() for q in range(n)])
            check(f"{algorithm} allgather {dtype}", out.device == device and close(out, expected, dtype, 1))
    if n == 1:  # the Communicator skips a world of one: call the transport's own collectives (NCCL's kernels) too
        for dtype in DTYPES:
            t = comm._staged(rank_tensor(0, 1001, dtype).to(device))
            expected = rank_tensor(0, 1001, dtype).double().numpy()
            out = torch.empty_like(t)
            comm._native_allreduce(t, "sum")
            comm._native_broadcast(t, 0)
            comm._native_reduce_scatter(t, out, "sum")
            check(f"{comm.backend}'s own allreduce, broadcast, reduce_scatter {dtype}", close(out, expected, dtype, 1))
            comm._native_allgather(t, out)
            check(f"{comm.backend}'s own allgather {dtype}", close(out, expected, dtype, 1))
    for dtype in DTYPES:
        t = rank_tensor(r, 1001, dtype).to(device)
        comm.broadcast(t, root=n - 1)
        expected = rank_tensor(n - 1, 1001, dtype).double().numpy()
        check(f"broadcast {dtype}", t.device == device and close(t, expected, dtype, 1))
    everyone = comm.allgather_object(failures)
    result = {"date": stamp(), "section": "collectives", "backend": comm.backend, "ranks": n, "device": str(device)}
    result |= {"checks_per_rank": checks, "refused": refused, "failures": {q: f for q, f in enumerate(everyone) if f}}
    if r == 0:
        write(args.json, result)
    return 1 if any(everyone) else 0


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 12, generator=gen), torch.randn(16, 3, generator=gen)


def ddp(args: argparse.Namespace) -> int:
    """distrib's DDP against torch's, both on the device (device_ids=[its index]), inputs given on the CPU."""
    from torch.nn.parallel import DistributedDataParallel as TorchDDP

    import distrib

    comm, device = setup(args.device, args.backend)
    ids = [device.index] if device.type == "cuda" else None
    weights, placed = {}, True
    for impl in ("torch", "distrib"):
        torch.manual_seed(100 + comm.rank)  # a different start on every rank: DDP must begin from rank 0's
        model = nn.Sequential(nn.Linear(12, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3)).to(device)
        if impl == "torch":
            wrapped = TorchDDP(model, device_ids=ids)
        else:
            wrapped = distrib.DistributedDataParallel(model, device_ids=ids, comm=comm)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
        for step in range(8):
            x, y = batch(comm.rank, step)
            out = wrapped(x)  # moved to device_ids[0] by the wrapper, as torch's does
            placed = placed and out.device == device
            F.mse_loss(out, y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[impl] = {k: v.detach().double().cpu() for k, v in wrapped.state_dict().items()}
    worst = max(float((weights["distrib"][k] - v).abs().max()) for k, v in weights["torch"].items())
    everyone = comm.allgather_object((worst, placed))
    result = {"date": stamp(), "section": "ddp", "backend": comm.backend, "ranks": comm.size, "device": str(device)}
    result |= {
        "max_abs_diff_vs_torch_ddp": max(w for w, _ in everyone),
        "outputs_on_device": all(p for _, p in everyone),
    }
    result["ok"] = result["max_abs_diff_vs_torch_ddp"] <= 1e-5 and result["outputs_on_device"]
    if comm.rank == 0:
        write(args.json, result)
    return 0 if result["ok"] else 1


def zero_parity(comm, device: torch.device) -> dict:
    """ZeRO-Offload with the model on the device against one-process torch.optim.AdamW there on the whole global
    batch, whole and tiled, 10 steps. (The reference sums the batch in the ranks' slices: summed whole, Adam turns
    float32 rounding into 1e-5 differences after a few steps at lr 1e-2, for torch's AdamW against itself too.)"""
    from distrib.zero import ZeroOffloadOptimizer

    worst = {}
    for tile in (None, 1024):
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8))
        reference = reference.to(device)
        model = copy.deepcopy(reference)
        opt = ZeroOffloadOptimizer(model.parameters(), lr=1e-2, weight_decay=0.01, comm=comm, tile_numel=tile)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
        part = 24 // comm.size
        for step in range(10):
            gen = torch.Generator().manual_seed(step)
            x, y = (torch.randn(24, k, generator=gen).to(device) for k in (32, 8))
            mine = slice(comm.rank * part, (comm.rank + 1) * part)
            F.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
            for q in range(comm.size):  # the global batch's mean loss, summed in the ranks' slices (the same bits)
                rows = slice(q * part, (q + 1) * part)
                (F.mse_loss(reference(x[rows]), y[rows]) / comm.size).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        # torch.testing.assert_close's test at rtol=1e-5, atol=1e-6: |p - q| / (atol + rtol |q|), at most 1 to pass
        pairs = [(p.detach(), q.detach()) for p, q in zip(model.parameters(), reference.parameters())]
        worst[str(tile)] = max(float(((p - q).abs() / (1e-6 + 1e-5 * q.abs())).max()) for p, q in pairs)
        on = all(p.device == device for p in model.parameters()) and opt._exp_avg.device.type == "cpu"
        worst[str(tile)] = worst[str(tile)] if on else float("inf")
    return {"assert_close_ratio_vs_adamw": worst, "ok": all(w <= 1 for w in worst.values())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zero_bench(comm, device: torch.device, params: float, steps: int, keep=lambda rows: None) -> list[dict]:
    """Step time and device memory: AdamW on the device (fp32 weights, bf16 autocast) against ZeRO-Offload (bf16
    weights on the device, fp32 masters and moments on the CPU), its copies tiled or in one piece, delayed or not."""
    from distrib.zero import ZeroOffloadOptimizer

    layers = 16
    width = max(64, int((params / layers) ** 0.5) // 64 * 64)  # 16 square layers: 1e9 parameters, width 7872
    rows = []
    variants = [("device AdamW (fused), fp32 weights, bf16 autocast", None), ("ZeRO-Offload, tiled", {})]
    variants += [("ZeRO-Offload, one tile", {"tile_numel": None})]
    variants += [("ZeRO-Offload, tiled, delay_update", {"delay_update": True})]
    for name, zero in variants:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        with torch.device(device):
            model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
        if zero is None:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        else:
            model = model.to(torch.bfloat16)
            opt = ZeroOffloadOptimizer(model.parameters(), lr=1e-4, comm=comm, **zero)
        x = torch.randn(256, width, device=device)
        times = []
        for _ in range(steps + 1):  # the first step is not timed: it allocates AdamW's state
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sync(device)
            times.append(time.perf_counter() - start)
        if zero is not None and zero.get("delay_update"):
            opt.flush()
        count = sum(p.numel() for p in model.parameters())
        row = {"impl": name, "params": count, "width": width, "layers": layers, "batch": 256}
        row |= {"step_ms_median": statistics.median(times[1:]) * 1e3, "step_ms": [t * 1e3 for t in times[1:]]}
        if device.type == "cuda":
            row["device_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if zero is not None:
            row["optimizer_state_on_cpu_gib"] = opt.state_nbytes() / 2**30
        rows.append(row)
        print(json.dumps(row), flush=True)
        keep(rows)  # written as it goes: a run cut short by its time limit keeps the rows it measured
        del model, opt, x, loss
    return rows


def zero(args: argparse.Namespace) -> int:
    comm, device = setup(args.device, args.backend)
    result = {"date": stamp(), "section": "zero", "backend": comm.backend, "ranks": comm.size, "device": str(device)}
    result["threads"] = torch.get_num_threads()
    result["parity"] = zero_parity(comm, device)

    def keep(rows: list[dict]) -> None:
        if comm.rank == 0:
            write(args.json, result | {"benchmark": rows})

    keep([])
    if args.params:
        zero_bench(comm, device, args.params, args.steps, keep)
    return 0 if result["parity"]["ok"] else 1


def learned(args: argparse.Namespace) -> int:
    """A distrib.train run learned as on the CPU: its last validation accuracy, and the device it said it used."""
    lines = (args.run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    said = (args.run / "stdout.txt").read_text() if (args.run / "stdout.txt").exists() else ""
    result = {"date": stamp(), "section": "train", "run": str(args.run), "epochs": len(lines)}
    result |= {"val_accuracy": last.get("val_accuracy"), "samples_per_s": last.get("samples_per_s")}
    result |= {"device_line": next((s for s in said.splitlines() if s.startswith("training ")), None)}
    result["ok"] = (last.get("val_accuracy") or 0) >= args.min_accuracy and f"on {args.device}" in (
        result["device_line"] or ""
    )
    write(args.json, result)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["env", "collectives", "ddp", "zero", "learned"])
    parser.add_argument("run", type=Path, nargs="?", help="learned: the run directory")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--params", type=float, default=0, help="zero: the benchmark model's size (0: no benchmark)")
    parser.add_argument("--steps", type=int, default=3, help="zero: timed steps per variant")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args(argv)
    return {"env": env, "collectives": collectives, "ddp": ddp, "zero": zero, "learned": learned}[args.section](args)


if __name__ == "__main__":
    sys.exit(main())
