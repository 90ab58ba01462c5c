"""The drop-in DistributedDataParallel: the wrapper registers hooks (wrapper.py), the buckets reduce (buckets.py)."""

from distrib.ddp.wrapper import DistributedDataParallel

__all__ = ["DistributedDataParallel"]
