"""The Communicator in twenty lines: mpirun -n 2 python examples/collectives.py (or torchrun --nproc-per-node 2)."""

import torch

import distrib

comm = distrib.init()  # MPI under mpirun, gloo under torchrun, a world of one under plain python
rank, size = comm.rank, comm.size
t = torch.full((4,), float(rank + 1))
comm.allreduce(t, op="sum", algorithm="ring")  # in place, on every rank: 1 + 2 + ... + size
assert torch.equal(t, torch.full((4,), size * (size + 1) / 2))
part = comm.reduce_scatter(torch.arange(2.0 * size))  # rank r gets the sum over ranks of elements 2r, 2r + 1
assert torch.equal(part, size * torch.tensor([2.0 * rank, 2.0 * rank + 1]))
full = comm.allgather(torch.tensor([float(rank)]))  # every rank's piece, in rank order
assert torch.equal(full, torch.arange(float(size)))
root = comm.broadcast(torch.tensor([float(rank)]), root=0)  # rank 0's tensor, everywhere
handle = comm.allreduce(torch.ones(3), op="avg", async_op=True)  # runs on a background thread meanwhile
assert torch.equal(handle.wait(), torch.ones(3)) and root.item() == 0.0
names = comm.allgather_object(f"rank {rank}")  # any picklable object
comm.barrier()
print(f"rank {rank} of {size}: allreduce {t[0]:g}, reduce_scatter {part.tolist()}, allgather {full.tolist()}, {names}")
