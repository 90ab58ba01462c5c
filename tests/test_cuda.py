"""CUDA paths at world size 1: NCCL, and CUDA tensors staged through host memory for MPI. Skipped without a GPU."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.launching import MPIEXEC, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

CHECK = """
import sys, torch, distrib
comm = distrib.init(sys.argv[1])
for algorithm in distrib.ALGORITHMS:
    t = torch.arange(10, dtype=torch.float32, device="cuda")
    assert comm.allreduce(t, algorithm=algorithm) is t and t.device.type == "cuda"
    assert torch.equal(t.cpu(), torch.arange(10, dtype=torch.float32)), (algorithm, t)
    out = comm.allgather(t[:4], algorithm=algorithm)
    assert out.device.type == "cuda" and torch.equal(out.cpu(), torch.arange(4, dtype=torch.float32))
print("cuda ok", comm.backend)
"""


@pytest.mark.parametrize("backend", ["nccl", "mpi"])
def test_cuda_tensors_at_world_size_one(backend):
    cmd = (
        [MPIEXEC, "-n", "1", sys.executable, "-c", CHECK, backend]
        if backend == "mpi"
        else [sys.executable, "-c", CHECK, backend]
    )
    result = run(cmd, timeout=120)
    assert result.returncode == 0 and f"cuda ok {backend}" in result.stdout, result.stderr[-3000:]
