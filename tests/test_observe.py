"""Seeing inside a run: the merged per-rank trace, TensorBoard scalars, and the where-the-time-went line."""

from __future__ import annotations

import json
import sys

from distrib.cli.report import where_time_went
from tests.launching import run, run_ranks


def test_trace_tensorboard_and_time_summary(tmp_path):
    trace_file, board = tmp_path / "trace.json", tmp_path / "tb"
    args = ["-m", "distrib.train", "--epochs", "1", "--batch-size", "1024", "--no-progress", "--out", str(tmp_path)]
    result = run_ranks("mpiexec", 2, [*args, "--trace", str(trace_file), "--tensorboard", str(board)], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads(trace_file.read_text())["traceEvents"]
    names = {(e["pid"], e["name"]) for e in events if e["ph"] == "X"}
    for rank in (0, 1):  # one track per rank, every stage of the loop on it
        for stage in ("collect", "forward", "backward", "step", "wait", "validation"):
            assert (rank, stage) in names, (rank, stage)
    forward = [e for e in events if e["ph"] == "X" and e["name"] == "forward" and e["pid"] == 0]
    assert len(forward) == 16 and all(e["dur"] > 0 for e in forward)  # 16384 samples / 1024 per step
    assert [e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"] == ["rank 0", "rank 1"]
    assert list(board.glob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    assert "time: compute" in result.stdout and "waiting on the slowest rank" in result.stdout


def test_time_summary_adds_up():
    stats = {"time_forward_s": 1.0, "time_backward_s": 3.0, "time_step_s": 1.0, "time_comm_s": 2.0,
             "time_wait_s": 1.0, "time_collect_s": 0.5, "time_data_s": 0.5, "time_validation_s": 1.0}  # fmt: skip
    line = where_time_went(stats)
    assert "compute 38%" in line and "communication not hidden 25%" in line  # 3 of 8 s, 2 of 8 s
    assert "waiting on the slowest rank 12%" in line and "data 12%" in line and "of 8.00 s" in line


def test_trace_shows_bucket_allreduces_overlapping_backward(tmp_path):
    path = tmp_path / "overlap.json"
    result = run_ranks("mpiexec", 2, ["tests/scripts/trace_overlap.py", str(path)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):
        backward = [e for e in events if e["pid"] == rank and e["name"] == "backward"]
        buckets = [e for e in events if e["pid"] == rank and e["name"] == "allreduce" and e["tid"] != "MainThread"]
        assert len(backward) == 3 and len(buckets) >= 6, (len(backward), len(buckets))  # 6 layers, 1 MiB each
        per_step = len(buckets) // 3
        assert [a["args"]["bucket"] for a in buckets] == list(range(per_step)) * 3  # launch order, every step
        for b in backward:
            end = b["ts"] + b["dur"]
            inside = [a for a in buckets if b["ts"] <= a["ts"] < end]
            # Overlap, read from the trace: several bucket allreduces start on the engine thread while backward
            # is still running, the first of them before the last bucket is even launched.
            assert len(inside) >= 2, inside
            assert min(a["ts"] for a in inside) < max(a["ts"] - a["args"]["queued_us"] for a in inside)


def test_plot_draws_runs_and_benchmark_results(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps({"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_accuracy": 0.5 + e / 10})
            for e in range(3)
        )  # fmt: skip
    )
    rows = [
        {"backend": "mpi", "algorithm": a, "bytes": b, "busbw_gbps": b / 1e6}
        for a in ("ring", "native")
        for b in (4096, 1 << 20)
    ]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows}))
    for target, made in ((tmp_path, tmp_path / "curves.png"), (tmp_path / "bench.json", tmp_path / "bench.busbw.png")):
        result = run([sys.executable, "-m", "distrib.cli.plot", str(target)], timeout=60)
        assert result.returncode == 0 and made.stat().st_size > 1000, result.stderr
    bad = run([sys.executable, "-m", "distrib.cli.plot", str(tmp_path / "missing")], timeout=60)
    assert bad.returncode == 2 and "usage: python -m distrib.cli.plot RUN_DIR | BENCHMARK.json" in bad.stderr
    assert f"error: {tmp_path / 'missing'}: no such file or directory" in bad.stderr, bad.stderr  # the reason too
    (tmp_path / "broken.json").write_text("{not json")
    broken = run([sys.executable, "-m", "distrib.cli.plot", str(tmp_path / "broken.json")], timeout=60)
    assert broken.returncode == 2 and "broken.json is not a benchmark's JSON (JSONDecodeError" in broken.stderr
    assert "Traceback" not in broken.stderr, broken.stderr
