"""A typical torch DDP training script on distrib: DistributedSampler, AdamW, a scheduler, clipping, and rank 0
saving the weights. It uses distrib by its imports only: two lines differ from torch's version of it,

    from distrib import DistributedDataParallel as DDP
    from distrib import init_process_group

where torch's version has

    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed import init_process_group

Run it under MPI or torchrun (torch's version needs torchrun: under mpirun torch cannot find its peers):

    mpirun -n 2 python examples/ddp_torch_style.py [OUT.pt]
    torchrun --standalone --nproc-per-node 2 examples/ddp_torch_style.py [OUT.pt]

It fits a small MLP to noisy points of a curved function; rank 0 prints the validation loss of each epoch and
saves the weights to OUT.pt (default model.pt).
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from distrib import DistributedDataParallel as DDP  # was: from torch.nn.parallel import ...
from distrib import init_process_group  # was: from torch.distributed import ...

EPOCHS, BATCH_PER_RANK = 4, 32


def data() -> tuple[TensorDataset, TensorDataset]:
    """2048 points y = sin(x @ w / 4) + noise, the same on every rank: 1792 to train on, 256 held out."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=gen)
    y = torch.sin(x @ torch.randn(16, 1, generator=gen) / 4) + 0.1 * torch.randn(2048, 1, generator=gen)
    return TensorDataset(x[:1792], y[:1792]), TensorDataset(x[1792:], y[1792:])


def main(out: str) -> None:
    init_process_group(backend="gloo")  # under mpirun too: distrib finds the peers through MPI
    rank = dist.get_rank()
    train, val = data()
    sampler = DistributedSampler(train, shuffle=True, seed=0)  # each rank its share, reshuffled each epoch
    loader = DataLoader(train, batch_size=BATCH_PER_RANK, sampler=sampler)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    ddp_model = DDP(model)  # gradients are averaged over ranks during backward
    optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * len(loader))
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        ddp_model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            F.mse_loss(ddp_model(inputs), targets).backward()
            torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        ddp_model.eval()
        with torch.no_grad():
            loss = F.mse_loss(ddp_model(val.tensors[0]), val.tensors[1])
        if rank == 0:
            print(f"epoch {epoch}: validation loss {loss.item():.4f}", flush=True)
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()  # no rank leaves while rank 0 still writes
    dist.destroy_process_group()  # before exit: gloo's threads must not outlive the interpreter


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "model.pt")
