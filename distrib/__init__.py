"""distrib: data-parallel training for PyTorch over one small Communicator interface."""

from distrib.comm import ALGORITHMS, OPS, CollectiveError, CollectiveTimeout, Communicator, Handle
from distrib.env import LaunchError, World, read_world
from distrib.world import BACKENDS, init

__all__ = [
    "ALGORITHMS",
    "BACKENDS",
    "OPS",
    "CollectiveError",
    "CollectiveTimeout",
    "Communicator",
    "Handle",
    "LaunchError",
    "World",
    "init",
    "read_world",
]
