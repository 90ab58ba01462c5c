"""Collectives, and nothing else: one Communicator interface, small backends, algorithms over any of them."""

from distrib.comm.base import ALGORITHMS, OPS, CollectiveError, CollectiveTimeout, Communicator
from distrib.comm.engine import Handle

__all__ = ["ALGORITHMS", "OPS", "CollectiveError", "CollectiveTimeout", "Communicator", "Handle"]
