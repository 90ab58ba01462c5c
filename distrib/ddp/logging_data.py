"""torch's DDP logging data (`_get_ddp_logging_data`): the settings, bucket sizes and errors a run records.

A mixin of DistributedDataParallel, as join.py's: the wrapper keeps what it logs in `_logging` and calls
`_log_runtime_stats` before each forward, `_throw` for every error it raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distrib.ddp import messages


class LoggingData:
    """The fields of torch's logging data that distrib knows the same way: no timings."""

    def __init__(self) -> None:
        self._logging: dict[str, Any] = {"iteration": 0}
        self._sample_rate = 100  # torch's: runtime stats every 100th iteration, after the first 10
        self._has_rebuilt_buckets = False

    def _get_ddp_logging_data(self) -> dict[str, Any]:
        """torch's field names and values, for the fields distrib has."""
        params = self.reducer.params
        return {
            "world_size": self.comm.size, "rank": self.comm.rank, "module_name": type(self.module).__name__,
            "backend_name": self.comm.backend, "device_ids": "",
            "output_device": -1, "broadcast_buffers": int(self.forward_sync_buffers),
            "bucket_cap_bytes": self.bucket_bytes_cap, "find_unused_parameters": int(self.find_unused_parameters),
            "gradient_as_bucket_view": int(self.gradient_as_bucket_view),
            "is_multi_device_module": int(self.is_multi_device_module), "num_parameter_tensors": len(params),
            "total_parameter_size_bytes": sum(p.numel() * p.element_size() for p in params),
            "dtypes": ", ".join(sorted({messages.TYPE_NAMES.get(p.dtype, str(p.dtype)) for p in params})),
            "has_error": int("error" in self._logging),
            **self._logging,
        }  # fmt: skip

    def _log_bucket_sizes(self) -> None:
        """The buckets at construction, as torch logs them."""
        self._logging["bucket_sizes"] = sizes(self.reducer.buckets)

    def _log_runtime_stats(self) -> None:
        """torch's logger, before a forward: at sampled iterations, the one just done and the rebuilt buckets."""
        done = self.reducer.num_iterations
        if done and (done <= 10 or done % self._sample_rate == 0):
            self._logging |= {"iteration": done, "has_rebuilt_buckets": int(self._has_rebuilt_buckets)}
            if self._has_rebuilt_buckets:
                self._logging["rebuilt_bucket_sizes"] = sizes(self.reducer.buckets)

    def _set_ddp_runtime_logging_sample_rate(self, sample_rate: int) -> None:
        if sample_rate < 1:
            raise ValueError("DDP runtime logging sample rate should be equal or greater than 1")
        self._sample_rate = sample_rate

    def _throw(self, kind: type[Exception], message: str, native: bool = False) -> None:
        """Raise, and keep the message where torch's logging data keeps it: with the exception's class where
        torch's Python raises it, without it where torch's C++ reducer does (`native`)."""
        self._logging["error"] = message if native else f"{kind}: {message}"
        raise kind(message)


def sizes(buckets: Sequence[Any]) -> str:
    """Bucket sizes in bytes, as torch's logging data lists them."""
    return ", ".join(str(b.flat.numel() * b.flat.element_size()) for b in buckets)
