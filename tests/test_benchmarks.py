"""The allreduce benchmark runs at 2 ranks and writes well-formed, self-consistent rows; the cost model recovers
known figures from synthetic timings, predicts held-out ones, and saves what algorithm="auto" reads."""

from __future__ import annotations

import argparse
import json
import random
import statistics
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
    both = [
        "peer",
        "naive",
        "ring",
        "native",
        "halving_doubling",
        "hierarchical",
        "auto",
    ]  # gloo's peer: its all_reduce
    expected = {("mpi", a, s) for a in [*both, "shm"] for s in (4096, 1 << 20)}  # shm is MPI's alone
    expected |= {("gloo", a, s) for a in both for s in (4096, 1 << 20)}
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
    """--verify off fingerprint: each algorithm measured both ways, call by call, in each of --rounds rounds."""
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
        assert len(on["vs_off_rounds"]) == 3 and 0.2 < on["vs_off"] < 5, on
        assert "vs_off" not in off and "check_us" not in off and abs(on["check_us"]) < 1e4, on


def test_the_check_s_cost_is_taken_over_pairs_of_calls():
    """vs_off and check_us: the median, over the pairs of calls made together (the i-th with and without the
    check, in each round), of their ratio and difference; not a ratio of the two medians."""
    torch = pytest.importorskip("torch")
    from benchmarks.allreduce import rows

    on, off = ("mpi", "ring", "fingerprint"), ("mpi", "ring", "off")
    rng = random.Random(0)
    rounds = []
    for _ in range(3):
        plain = [rng.choice([1e-3, 3e-3]) * rng.uniform(0.9, 1.1) for _ in range(41)]  # bimodal, as gloo's calls
        rounds.append({off: plain, on: [t * rng.uniform(1.0, 1.04) + 2e-6 for t in plain]})
    pairs = [(a, b) for r in rounds for a, b in zip(r[on], r[off])]
    row = next(r for r in rows(rounds, 1 << 20, torch.float32, 2, 1, {"cpu": 1.0}) if r["verify"] == "fingerprint")
    assert row["vs_off"] == pytest.approx(statistics.median(a / b for a, b in pairs))
    assert row["check_us"] == pytest.approx(statistics.median(a - b for a, b in pairs) * 1e6)
    assert row["vs_off_rounds"] == pytest.approx([statistics.median(r[on]) / statistics.median(r[off]) for r in rounds])


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
    args = ["--model", "gpt-tiny", "--ranks", "2", "--rounds", "1", "--steps", "3", "--impls", "distrib mpi ring"]
    args += ["--runs", "2"]
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
        assert r["vs_plain"] == pytest.approx(r["median_ms"] / rows[0]["median_ms"]), r
        assert len(r["vs_plain_runs"]) == 2 and r["vs_plain_runs"][-1] == r["vs_plain"], r  # this run's is the last
        assert r["vs_torch_median"] == pytest.approx(statistics.median(r["vs_torch_runs"])), r
        # exposed communication: steps paired with the no-communication steps taken beside them, not two medians
        assert len(r["steps_ms"]) == 3 and r["median_ms"] == pytest.approx(statistics.median(r["steps_ms"])), r
        paired = [t - plain for t, plain in zip(r["steps_ms"], rows[0]["steps_ms"])]
        assert r["exposed_comm_ms"] == pytest.approx(statistics.median(paired)), r


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


@pytest.mark.parametrize("bad", [["--ranks", "0"], ["--runs", "0"]])
def test_ddp_benchmark_refuses_bad_arguments(bad):
    result = run([sys.executable, "-m", "benchmarks.ddp", *bad], timeout=120)
    expected = "--ranks, --rounds, --steps, --threads and --runs must all be >= 1"
    assert result.returncode == 2 and expected in result.stderr, result.stderr


@pytest.mark.parametrize("text,value", [("4096", 4096), ("4K", 4096), ("256M", 256 << 20), ("1GiB", 1 << 30)])
def test_sizes_read_and_written(text, value):
    assert parse_bytes(text) == value
    assert parse_bytes(human_bytes(value)) == value


@pytest.mark.parametrize("text", ["0", "4X", "", "1.5"])
def test_bad_sizes_are_named(text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        parse_bytes(text)


TRUE = {  # a made-up model: every algorithm its own figures on each link
    "naive": {"intra": {"alpha": 30e-6, "beta": 1 / 2e9}, "inter": {"alpha": 300e-6, "beta": 1 / 0.12e9}},
    "ring": {"intra": {"alpha": 20e-6, "beta": 1 / 3e9}, "inter": {"alpha": 250e-6, "beta": 1 / 0.11e9}},
    "halving_doubling": {"intra": {"alpha": 25e-6, "beta": 1 / 2.5e9}, "inter": {"alpha": 260e-6, "beta": 1 / 0.1e9}},
    "hierarchical": {"intra": {"alpha": 22e-6, "beta": 1 / 4e9}, "inter": {"alpha": 270e-6, "beta": 1 / 0.1e9}},
    "shm": {"intra": {"alpha": 15e-6, "beta": 1 / 6e9}},
}
LAYOUTS = [(1, 2), (2, 1), (3, 1), (4, 1), (2, 2)]


def _rows(noise: float = 0.0) -> list[dict]:
    """Rows as benchmarks.shaped writes them, timed by TRUE (times a random factor within 1 +- noise)."""
    rng, rows = random.Random(0), []
    for hosts, per_host in LAYOUTS:
        for algorithm in TRUE:
            for nbytes in (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20):
                seconds = model.auto.predict(TRUE, algorithm, nbytes, hosts, per_host)
                if seconds is None or (algorithm == "shm" and hosts > 1):
                    continue
                row = {"backend": "mpi", "algorithm": algorithm, "ranks": hosts * per_host, "hosts": hosts}
                rows.append(
                    row
                    | {"bytes": nbytes, "dtype": "float32", "time_us": seconds * 1e6 * (1 + noise * rng.uniform(-1, 1))}
                )
    return rows


def test_fit_recovers_every_algorithms_figures_on_both_links():
    fitted = model.fit(_rows())
    assert fitted.keys() == TRUE.keys()
    for algorithm, links in TRUE.items():
        for link, pair in links.items():
            assert fitted[algorithm][link] == pytest.approx(pair, rel=1e-6), (algorithm, link)


def test_model_holds_out_points_extrapolates_and_saves_what_auto_reads(tmp_path, capsys):
    path, saved, tables, figure = (tmp_path / name for name in ("rows.json", "model.json", "tables.json", "fit.png"))
    path.write_text(json.dumps({"rows": _rows(noise=0.05), "link": {"describe": "1 Gbit/s, 100 us"}}))
    model.main([str(path), "--save", str(saved), "--json", str(tables), "--plot", str(figure), "--ranks", "8", "4096"])
    text = capsys.readouterr().out
    assert "error on the held-out points" in text and "what auto would choose" in text
    result = json.loads(tables.read_text())
    held = {(e["layout"], e["size"]) for e in result["errors"] if e["layout"] in ("3x1", "2x2") or e["size"] == "4M"}
    assert len(held) > 10 and result["held_out_summary"][-1]["algorithm"] == "all"
    assert result["held_out_summary"][-1]["median_err"] < 0.05  # 5% noise: within it
    assert {row["ranks"] for row in result["extrapolation"]["auto"]} == {8, 4096}
    assert model.auto.load(str(saved)).keys() == TRUE.keys()
    assert json.loads(saved.read_text())["choices"]["2x2"]["16777216"] in model.auto.options(2, 2)
    assert figure.stat().st_size > 10_000


@pytest.mark.heavy
def test_shaped_benchmark_runs_on_namespace_hosts(tmp_path):
    """A smoke run: two layouts, two sizes, one repeat; JSON rows for every algorithm that runs there, and a plot."""
    from tests import netns

    if (reason := netns.unavailable(shaped=True)) is not None:
        pytest.skip(reason)
    out, figure = tmp_path / "shaped.json", tmp_path / "shaped.png"
    args = ["-m", "benchmarks.shaped", "--layouts", "2x1", "1x2", "--repeats", "1", "--sizes", "4K", "64K"]
    result = run([sys.executable, *args, "--iters", "2", "--json", str(out), "--plot", str(figure)], timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["algorithm"]) for r in rows} >= {("2x1", "ring"), ("1x2", "shm"), ("2x1", "hierarchical")}
    assert all(r["time_us"] > 0 and r["repeats"] == 1 for r in rows) and figure.stat().st_size > 10_000


@pytest.mark.heavy
def test_diloco_benchmark_runs_on_namespace_hosts(tmp_path):
    """A smoke run: classify at its own width for one epoch of 100 steps, every variant once; a curve for each (DDP
    validated every 10 steps, DiLoCo at each sync), and a plot."""
    from benchmarks import diloco
    from tests import netns

    if (reason := netns.unavailable(shaped=True)) is not None:
        pytest.skip(reason)
    out, figure = tmp_path / "diloco.json", tmp_path / "diloco.png"
    args = ["-m", "benchmarks.diloco", "--settings", "classify-128", "--repeats", "1", "--epochs", "1"]
    result = run([sys.executable, *args, "--json", str(out), "--plot", str(figure)], timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["runs"]] == list(diloco.VARIANTS)
    assert [len(r["curve"]) for r in data["runs"]] == [10, 10, 2] and {r["steps"] for r in data["runs"]} == {100}
    by = {r["variant"]: r["bytes_per_step"] for r in data["summary"] if r["target"] == 0.2}
    assert by["ddp"] > 9 * by["diloco-h10"] > 4 * by["diloco-h50"]  # a sync every 10 or 50 steps instead of each
    assert figure.stat().st_size > 10_000


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
