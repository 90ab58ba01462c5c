"""The allreduce benchmark runs at 2 ranks and writes well-formed, self-consistent rows; the cost model recovers
known latency and bandwidth from synthetic timings."""

from __future__ import annotations

import argparse
import json
import random
import sys

import pytest

from benchmarks import gpt, model
from benchmarks.common import human_bytes, parse_bytes
from tests.launching import run, run_ranks


def test_allreduce_benchmark_at_two_ranks(tmp_path):
    out, png = tmp_path / "rows.json", tmp_path / "busbw.png"
    args = ["-m", "benchmarks.allreduce", "--sizes", "4K", "1M", "--iters", "10", "--warmup", "1"]
    result = run_ranks("mpiexec", 2, [*args, "--json", str(out), "--plot", str(png)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "memory copy" in result.stdout and "GB/s" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    rows, copy = data["rows"], data["copy_gbps"]["cpu"]
    assert data["ranks"] == 2 and copy > 0 and data["command"].startswith("python -m benchmarks.allreduce")
    mpi = ["peer", "naive", "ring", "native", "shm"]  # shm is MPI's alone; gloo's peer is its own all_reduce
    expected = {("mpi", a, s) for a in mpi for s in (4096, 1 << 20)}
    expected |= {("gloo", a, s) for a in mpi[:-1] for s in (4096, 1 << 20)}
    assert {(r["backend"], r["algorithm"], r["bytes"]) for r in rows} == expected
    peers = {(r["backend"], r["bytes"]): r["time_us"] for r in rows if r["algorithm"] == "peer"}
    for r in rows:
        assert r["ranks"] == 2 and r["dtype"] == "float32" and r["count"] * 4 == r["bytes"], r
        assert r["calls"] >= 10 and 0 < r["min_us"] <= r["time_us"] <= r["max_us"], r
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3), r
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"]), r  # 2(n-1)/n = 1 at two ranks
        assert r["vs_peer"] == pytest.approx(peers[r["backend"], r["bytes"]] / r["time_us"]), r
        assert r["of_copy"] == pytest.approx(r["busbw_gbps"] / copy), r


def test_allreduce_benchmark_compares_the_call_check_on_and_off(tmp_path):
    """--verify off fingerprint: each algorithm measured both ways in each of --rounds rounds; vs_off is the median
    of the rounds' ratios of the check's time to the time without it."""
    out = tmp_path / "rows.json"
    args = ["-m", "benchmarks.allreduce", "--backends", "mpi", "--algorithms", "native", "ring", "--sizes", "64K"]
    args += ["--iters", "5", "--warmup", "1", "--verify", "off", "fingerprint", "--rounds", "3", "--json", str(out)]
    result = run_ranks("mpiexec", 2, args, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["algorithm"], r["verify"]): r for r in data["rows"]}
    assert set(rows) == {
        ("peer", "-"),
        ("native", "off"),
        ("native", "fingerprint"),
        ("ring", "off"),
        ("ring", "fingerprint"),
    }
    assert data["settings"]["rounds"] == 3
    for algorithm in ("native", "ring"):
        on, off = rows[algorithm, "fingerprint"], rows[algorithm, "off"]
        assert on["calls"] == off["calls"] == 3 * 5 * 20  # small sizes take up to 20x --iters calls
        assert len(on["vs_off_rounds"]) == 3 and on["vs_off"] == pytest.approx(sorted(on["vs_off_rounds"])[1])
        assert "vs_off" not in off and 0.2 < on["vs_off"] < 5, on


def test_allreduce_benchmark_refuses_bad_arguments():
    result = run([sys.executable, "-m", "benchmarks.allreduce", "--sizes", "4K", "--iters", "0"], timeout=120)
    assert result.returncode != 0
    assert "--warmup, --iters and --rounds must be at least 1, got 2, 0 and 1" in result.stderr


def test_ddp_benchmark_at_one_and_two_ranks(tmp_path):
    out, png = tmp_path / "ddp.json", tmp_path / "ddp.png"
    args = ["--ranks", "1", "2", "--rounds", "1", "--steps", "1", "--impls", "distrib mpi ring"]
    result = run([sys.executable, "-m", "benchmarks.ddp", *args, "--json", str(out), "--plot", str(png)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())["rows"]
    impls = ["no communication", "torch DDP gloo", "distrib mpi ring"]
    assert [(r["ranks"], r["impl"]) for r in rows] == [(n, i) for n in (1, 2) for i in impls]
    for r in rows:
        torch_ddp = next(t for t in rows if t["ranks"] == r["ranks"] and t["impl"] == "torch DDP gloo")
        one = next(o for o in rows if o["ranks"] == 1 and o["impl"] == r["impl"])
        assert r["vs_torch"] == pytest.approx(r["median_ms"] / torch_ddp["median_ms"]), r
        assert r["efficiency"] == pytest.approx(r["samples_per_s"] / (r["ranks"] * one["samples_per_s"])), r
        assert r["samples_per_s"] == pytest.approx(256 / (r["median_ms"] / 1e3)), r
        assert (r["allreduce_ms"] is None) == (r["impl"] == "no communication"), r
    assert all(r["allreduce_ms"] > 0 for r in rows if r["ranks"] == 2 and r["impl"] != "no communication")


def test_ddp_benchmark_trains_the_gpt(tmp_path):  # the code of the 19.5M-parameter GPT, at the tiny size
    out, png = tmp_path / "ddp.json", tmp_path / "ddp.png"
    args = ["--model", "gpt-tiny", "--ranks", "2", "--rounds", "1", "--steps", "1", "--impls", "distrib mpi ring"]
    result = run([sys.executable, "-m", "benchmarks.ddp", *args, "--json", str(out), "--plot", str(png)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["no communication", "torch DDP gloo", "distrib mpi ring"]  # torch DDP beside
    params = sum(p.numel() for p in gpt.model("gpt-tiny").parameters())
    torch_ddp = rows[1]
    for r in rows:
        assert r["model"] == "gpt-tiny" and r["params"] == params and r["batch_per_rank"] == 4, r  # 8 sequences
        assert r["vs_torch"] == pytest.approx(r["median_ms"] / torch_ddp["median_ms"]), r
        assert r["samples_per_s"] == pytest.approx(8 / (r["median_ms"] / 1e3)), r
        assert (r["allreduce_ms"] is None) == (r["impl"] == "no communication"), r


def test_zero_benchmark_cpu_adam_and_train_at_one_and_two_ranks(tmp_path):
    paths = {name: tmp_path / name for name in ("adam.json", "adam.png", "train.json", "train.png")}
    args = ["--sizes", "1e4", "--warmup", "1", "--repeats", "2", "--ranks", "1", "2", "--algorithms", "ring"]
    args += ["--batch", "4", "--json", str(paths["adam.json"]), "--plot", str(paths["adam.png"])]
    args += ["--train-json", str(paths["train.json"]), "--train-plot", str(paths["train.png"])]
    result = run([sys.executable, "-m", "benchmarks.zero", *args], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for png in (paths["adam.png"], paths["train.png"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adam = json.loads(paths["adam.json"].read_text())
    assert adam["machine"]["cores"] >= 1 and adam["machine"]["threads"] >= 1
    fused = next(r for r in adam["rows"] if r["impl"] == "torch fused=True")
    for r in adam["rows"]:
        if r["params"] == 10_000:
            assert r["speed_vs_torch_fused"] == pytest.approx(fused["median_ms"] / r["median_ms"]), r
    train = json.loads(paths["train.json"].read_text())["rows"]
    impls = ["DDP+Adam", "ZeRO-Offload", "ZeRO-Offload delay_update"]
    assert [(r["ranks"], r["impl"]) for r in train] == [(n, i) for n in (1, 2) for i in impls]
    memory = {(r["ranks"], r["impl"]): r["optimizer_mb_per_rank"] for r in train}
    assert memory[2, "ZeRO-Offload"] == pytest.approx(memory[1, "ZeRO-Offload"] / 2, rel=1e-3)  # a shard per rank
    assert memory[2, "DDP+Adam"] == memory[1, "DDP+Adam"]  # every rank holds all of it


def test_zero_benchmark_trains_the_gpt(tmp_path):  # the code of the 19.5M-parameter GPT, at the tiny size
    paths = {name: tmp_path / name for name in ("train.json", "train.png")}
    args = ["--sections", "train", "--model", "gpt-tiny", "--warmup", "1", "--repeats", "1", "--ranks", "2"]
    args += ["--algorithms", "ring", "--batch", "1", "--train-json", str(paths["train.json"])]
    result = run([sys.executable, "-m", "benchmarks.zero", *args, "--train-plot", str(paths["train.png"])], 600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert paths["train.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = json.loads(paths["train.json"].read_text())
    assert train["settings"]["model"] == "gpt-tiny" and "GPT (1x32, 2 heads" in train["settings"]["gpt"]
    rows = train["rows"]
    impls = ["DDP+Adam", "ZeRO-Offload", "ZeRO-Offload delay_update"]
    assert [(r["ranks"], r["impl"]) for r in rows] == [(2, i) for i in impls]
    params = sum(p.numel() for p in gpt.model("gpt-tiny").parameters())
    assert all(r["model"] == "gpt-tiny" and r["params"] == params for r in rows), rows
    assert rows[1]["memory_vs_ddp"] == pytest.approx(0.5, rel=1e-3)  # a shard of Adam's state per rank


def test_ddp_benchmark_refuses_bad_arguments():
    result = run([sys.executable, "-m", "benchmarks.ddp", "--ranks", "0"], timeout=120)
    assert result.returncode == 2 and "--ranks, --rounds, --steps and --threads must all be >= 1" in result.stderr


@pytest.mark.parametrize("text,value", [("4096", 4096), ("4K", 4096), ("256M", 256 << 20), ("1GiB", 1 << 30)])
def test_sizes_read_and_written(text, value):
    assert parse_bytes(text) == value
    assert parse_bytes(human_bytes(value)) == value


@pytest.mark.parametrize("text", ["0", "4X", "", "1.5"])
def test_bad_sizes_are_named(text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        parse_bytes(text)


def _points(shape: str, alpha: float, beta: float, noise: float = 0.0) -> list[tuple[int, int, float]]:
    rng = random.Random(0)
    points = []
    for n in (2, 4, 8):
        for nbytes in (4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20):
            a, b = model.SHAPES[shape](n)
            points.append((n, nbytes, (a * alpha + b * nbytes * beta) * (1 + noise * rng.uniform(-1, 1))))
    return points


@pytest.mark.parametrize("shape", ["naive", "ring", "halving-doubling", "shm"])
def test_fit_recovers_latency_and_bandwidth(shape):
    alpha, beta = 7e-6, 1 / 3e9
    exact = model.fit(shape, _points(shape, alpha, beta))
    assert exact.alpha == pytest.approx(alpha, rel=1e-9) and exact.beta == pytest.approx(beta, rel=1e-9)
    assert exact.max_error < 1e-9 and exact.points == 15
    noisy = model.fit(shape, _points(shape, alpha, beta, noise=0.05))
    assert noisy.alpha == pytest.approx(alpha, rel=0.1) and noisy.beta == pytest.approx(beta, rel=0.1)
    assert 0.001 < noisy.median_error <= noisy.max_error < 0.1


def test_crossover_is_where_the_predictions_meet():
    alpha, beta = 2e-6, 1 / 12.5e9
    fits = model.network_fits(alpha, 1 / beta)
    at = model.crossover(fits["recursive doubling"], fits["ring"], 64)
    assert at == pytest.approx(alpha * (2 * 63 - 6) / (beta * (6 - 2 * 63 / 64)))
    assert fits["recursive doubling"].time(64, at) == pytest.approx(fits["ring"].time(64, at))
    assert fits["recursive doubling"].time(64, at / 2) < fits["ring"].time(64, at / 2)
    assert model.crossover(fits["naive"], fits["ring"], 64) is None  # same latency term, ring always ahead


def test_model_reads_benchmark_rows(tmp_path, capsys):
    """Rows as benchmarks.allreduce writes them: the fit, naive's growth with the world size, the predictions."""
    rows = []
    for algorithm in ("naive", "ring"):
        for n, nbytes, seconds in _points(algorithm, 20e-6, 1 / 2e9):
            rows.append({"backend": "mpi", "algorithm": algorithm, "ranks": n, "bytes": nbytes, "dtype": "float32"})
            rows[-1]["time_us"] = seconds * 1e6
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": rows}))
    fits = model.fits_of(rows)
    assert fits["mpi", "naive"].alpha == pytest.approx(20e-6) and fits["mpi", "ring"].beta == pytest.approx(5e-10)
    growth = [r for r in model.scaling(rows, fits, [256 << 20]) if r["algorithm"] == "naive"]
    assert growth[0]["measured"] == pytest.approx(growth[0]["model"]) == pytest.approx(7.0, rel=0.01)  # 2*7 / 2*1
    model.main([str(path), "--ranks", "8", "4096"])
    text = capsys.readouterr().out
    assert "predicted ms on 100 Gb InfiniBand" in text and "4096 ranks: recursive doubling beats ring below" in text


def test_checkpoint_benchmark_at_two_ranks(tmp_path):
    out, png = tmp_path / "checkpoint.json", tmp_path / "checkpoint.png"
    args = ["-m", "benchmarks.checkpoint", "--params", "1e4", "1e5", "--checkpoints", "2", "--steps-between", "2"]
    result = run_ranks("mpiexec", 2, [*args, "--json", str(out), "--plot", str(png)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["ranks"] == 2 and [(r["mode"], r["params"] > 5e4) for r in rows] == [
        ("sync", False), ("async", False), ("sync", True), ("async", True)]  # fmt: skip
    for sync, background in zip(rows[::2], rows[1::2]):
        assert sync["checkpoint_mb"] == background["checkpoint_mb"] > 0
        for r in (sync, background):
            assert 0 < r["pause_min_ms"] <= r["pause_median_ms"] <= r["pause_max_ms"] and r["write_median_ms"] > 0, r
        assert background["sync_over_async"] == pytest.approx(sync["pause_median_ms"] / background["pause_median_ms"])
