"""ZeRO-Offload: the optimizer (optimizer.py), its flat shard layout (layout.py), the fused CPU Adam (cpu_adam.py)."""

from distrib.zero.optimizer import ZeroOffloadOptimizer

__all__ = ["ZeroOffloadOptimizer"]
