"""A typical torch DDP training script, run with torch's DDP or distrib's: only the imports differ.

Usage: ddp_train.py torch|distrib BACKEND OUT [ALGORITHM ...]
torch: torch.nn.parallel.DistributedDataParallel. Under mpirun torch cannot find its peers by itself, so there
distrib.init_process_group starts its gloo group (that is the drop-in's point). distrib: distrib's DDP and
init_process_group, the model trained once per ALGORITHM. Rank r saves its state_dict to OUT.ALGORITHM.rank{r}.pt
(ALGORITHM is "torch" for torch's run).
"""

import os
import sys
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

impl, backend, out = sys.argv[1:4]
if impl == "torch":
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "PMI_RANK" in os.environ:
        from distrib import init_process_group
    else:
        from torch.distributed import init_process_group
else:
    from distrib import DistributedDataParallel as DDP
    from distrib import init_process_group


def train(make_ddp) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # a different start on every rank: DDP must begin from rank 0's weights
    model = nn.Sequential(
        nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )
    ddp = make_ddp(model)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(320, 12, generator=gen), torch.randn(320, 3, generator=gen))
    sampler = DistributedSampler(data, shuffle=True, seed=1)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        ddp.train()
        for step, (x, y) in enumerate(loader):
            if step % 2 == 0:  # accumulate two batches per optimizer step, synchronising only the second
                with ddp.no_sync():
                    F.mse_loss(ddp(x), y).backward()
                continue
            F.mse_loss(ddp(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        ddp.eval()
        with torch.no_grad():
            loss = F.mse_loss(ddp(data.tensors[0]), data.tensors[1])
        if rank == 0:
            print(f"{impl} epoch {epoch}: loss {loss.item():.6f}", flush=True)
    dist.barrier()
    return ddp.state_dict()


init_process_group(backend=backend)
for algorithm in sys.argv[4:] if impl == "distrib" else ["torch"]:
    make = partial(DDP, algorithm=algorithm) if impl == "distrib" else DDP
    torch.save(train(make), f"{out}.{algorithm}.rank{dist.get_rank()}.pt")
