"""distrib: data-parallel training for PyTorch over one small Communicator interface."""

from distrib.comm import ALGORITHMS, OPS, CollectiveError, CollectiveTimeout, Communicator, Handle
from distrib.ddp import DistributedDataParallel
from distrib.env import LaunchError, World, read_world
from distrib.tracing import trace
from distrib.world import BACKENDS, init, init_process_group
from distrib.zero import ZeroOffloadOptimizer

__all__ = [
    "ALGORITHMS",
    "BACKENDS",
    "OPS",
    "CollectiveError",
    "CollectiveTimeout",
    "Communicator",
    "DistributedDataParallel",
    "Handle",
    "LaunchError",
    "World",
    "ZeroOffloadOptimizer",
    "init",
    "init_process_group",
    "read_world",
    "trace",
]
