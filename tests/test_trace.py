"""The Chrome-trace recorder: spans land on the right track with sane times; off, it is a shared no-op."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from distrib import tracing
from distrib.comm.local import LocalCommunicator
from distrib.process import STATE


def test_spans_are_recorded_per_thread_and_merged(tmp_path):
    path = tmp_path / "trace.json"
    with tracing.trace(path, LocalCommunicator()) as rec:
        with tracing.span("forward", step=1):
            with tracing.span("inner", cat="test"):
                pass
        start = rec.now()
        worker = threading.Thread(target=lambda: rec.add("allreduce", "comm", start, start + 5000), name="engine")
        worker.start()
        worker.join()
    events = json.loads(path.read_text())["traceEvents"]
    spans = {e["name"]: e for e in events if e["ph"] == "X"}
    assert set(spans) == {"forward", "inner", "allreduce"}
    assert spans["forward"]["args"] == {"step": 1} and spans["inner"]["cat"] == "test"
    outer, inner = spans["forward"], spans["inner"]
    assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    assert spans["allreduce"]["tid"] == "engine" and spans["forward"]["tid"] == threading.current_thread().name
    assert spans["allreduce"]["dur"] == 5.0
    assert {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "rank 0"}} in events


def test_off_is_a_shared_no_op():
    assert STATE.recorder is None
    assert tracing.span("a") is tracing.span("b")


def test_traces_do_not_nest(tmp_path):
    with tracing.trace(tmp_path / "a.json", LocalCommunicator()):
        with pytest.raises(RuntimeError, match="traces do not nest"):
            with tracing.trace(tmp_path / "b.json", LocalCommunicator()):
                pass
    assert STATE.recorder is None


def test_collective_spans_carry_their_label(tmp_path):
    path, comm = tmp_path / "trace.json", LocalCommunicator()
    with tracing.trace(path, comm):
        comm.allreduce(torch.ones(4), label={"bucket": 3})
        comm.allreduce(torch.ones(4), async_op=True, label={"bucket": 4}).wait()
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X" and e["name"] == "allreduce"]
    assert [(s["args"]["bucket"], s["args"]["bytes"], s["args"]["algorithm"]) for s in spans] == [
        (3, 16, "native"),
        (4, 16, "native"),
    ]
