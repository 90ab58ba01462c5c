"""Checkpoints that survive a killed rank: when to write them (checkpointer.py), what they hold (state.py), how
one is written (writing.py), in the background if asked (background.py), the files on disk (store.py) written
atomically (atomic.py), whether one fits this run (mismatch.py), ranks agreeing on problems (agree.py), RNG states
(rng.py).
"""

from distrib.checkpoint.agree import CheckpointError
from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.state import TrainingState
from distrib.checkpoint.store import NoCheckpoint, find, load, verify
from distrib.checkpoint.writing import save

__all__ = ["CheckpointError", "Checkpointer", "NoCheckpoint", "TrainingState", "find", "load", "save", "verify"]
