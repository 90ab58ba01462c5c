"""examples/ddp_torch_style.py with ZeRO-Offload: no DDP wrapper; the optimizer averages the gradients, keeps this
rank's shard of AdamW's state (an Nth of it) in CPU memory, steps it there, and gathers the weights back.

    mpirun -n 2 python examples/zero_offload.py [OUT.pt]
    torchrun --standalone --nproc-per-node 2 examples/zero_offload.py [OUT.pt]

The same data, model and hyperparameters as the DDP example, so both end at the same weights.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from distrib import ZeroOffloadOptimizer, init_process_group

EPOCHS, BATCH_PER_RANK = 4, 32


def data() -> tuple[TensorDataset, TensorDataset]:
    """2048 points y = sin(x @ w / 4) + noise, the same on every rank: 1792 to train on, 256 held out."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=gen)
    y = torch.sin(x @ torch.randn(16, 1, generator=gen) / 4) + 0.1 * torch.randn(2048, 1, generator=gen)
    return TensorDataset(x[:1792], y[:1792]), TensorDataset(x[1792:], y[1792:])


def main(out: str) -> None:
    init_process_group(backend="gloo")
    rank = dist.get_rank()
    train, val = data()
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=BATCH_PER_RANK, sampler=sampler)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = ZeroOffloadOptimizer(model.parameters(), lr=3e-3, weight_decay=0.01, adamw=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * len(loader))
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            F.mse_loss(model(inputs), targets).backward()  # no hooks: gradients stay local until step()
            optimizer.clip_grad_norm_(1.0)  # the norm of the averaged gradient, over every rank's shard
            optimizer.step()  # reduce-scatter the gradients, AdamW on this rank's shard on the CPU, allgather
            scheduler.step()
        model.eval()
        with torch.no_grad():
            loss = F.mse_loss(model(val.tensors[0]), val.tensors[1])
        if rank == 0:
            print(f"epoch {epoch}: validation loss {loss.item():.4f}", flush=True)
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()  # no rank leaves while rank 0 still writes


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "model.pt")
