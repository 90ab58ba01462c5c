"""Trains a few steps of a 6-layer MLP in small DDP buckets under distrib.trace; the test reads the trace."""

import sys

import torch
from torch import nn

import distrib
from distrib.tracing import span

comm = distrib.init()
torch.manual_seed(0)
layers = [nn.Linear(512, 512) for _ in range(6)]  # backward takes tens of ms: time for buckets to overlap
model = distrib.DistributedDataParallel(nn.Sequential(*layers), comm=comm, bucket_cap_mb=1, algorithm="ring")
model(torch.randn(2048, 512)).square().mean().backward()  # as torch: one bucket until the order is known
with distrib.trace(sys.argv[1], comm):
    for _ in range(3):
        loss = model(torch.randn(2048, 512)).square().mean()
        with span("backward"):
            loss.backward()
