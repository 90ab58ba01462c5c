"""distrib: data-parallel training for PyTorch over one small Communicator interface.

The public API: start (`init`, `init_process_group`), communicate (`Communicator` and its errors), wrap a model
(`DistributedDataParallel`) or an optimizer (`ZeroOffloadOptimizer`), and train through the universal loop (`fit`
of a `Task` with a `LoopConfig`, minibatches sharded like `ShardedBatchSampler`'s), seen through `trace`.
"""

from distrib.comm import ALGORITHMS, OPS, CollectiveError, CollectiveTimeout, Communicator, Handle
from distrib.data import ShardedBatchSampler
from distrib.ddp import DistributedDataParallel
from distrib.env import LaunchError
from distrib.loop import LoopConfig, Progress, fit
from distrib.process import BACKENDS, init, init_process_group
from distrib.tasks import Task
from distrib.tracing import trace
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
    "LoopConfig",
    "Progress",
    "ShardedBatchSampler",
    "Task",
    "ZeroOffloadOptimizer",
    "fit",
    "init",
    "init_process_group",
    "trace",
]
