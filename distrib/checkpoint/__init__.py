"""Checkpoints that survive a killed rank: when to write them (checkpointer.py), what they hold (state.py), the
files on disk (store.py) written atomically (atomic.py), whether one fits this run (mismatch.py), RNG states (rng.py).
"""

from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.state import TrainingState
from distrib.checkpoint.store import CheckpointError, find, load, save, verify

__all__ = ["CheckpointError", "Checkpointer", "TrainingState", "find", "load", "save", "verify"]
