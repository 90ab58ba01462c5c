"""Collectives, and nothing else: one Communicator interface, small transports, algorithms over any of them."""

from distrib.comm.algorithms import ALGORITHMS
from distrib.comm.base import Communicator
from distrib.comm.contract import OPS, CollectiveError, CollectiveTimeout
from distrib.comm.engine import Handle

__all__ = ["ALGORITHMS", "OPS", "CollectiveError", "CollectiveTimeout", "Communicator", "Handle"]
