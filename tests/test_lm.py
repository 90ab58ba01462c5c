"""The language model: its corpus (a fixed file list, whole files held out, one line for each bad --data), the GPT
against a reference forward written out by hand, and the task through python -m distrib.train: it learns at 2
ranks, 1 and 3 ranks train the same weights, ZeRO-Offload, accumulation and clipping match, and resume is exact."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from distrib import train
from distrib.comm.local import LocalCommunicator
from distrib.loop import LoopConfig, Progress, Stopped, fit
from distrib.tasks import corpus
from distrib.tasks.gpt import GPT, PRESETS, CausalSelfAttention, GPTConfig, preset
from distrib.tasks.lm import LanguageModel
from tests.launching import run, run_ranks

TRAIN = ["-m", "distrib.train", "--no-progress"]


@pytest.fixture(scope="module")
def stdlib() -> corpus.Corpus:
    return corpus.load()


# The corpus.


def test_stdlib_corpus_is_a_fixed_sorted_list_with_whole_files_held_out(stdlib):
    root, files = corpus.stdlib_files()
    names = [f.relative_to(root).as_posix() for f in files]
    # Walked again another way: os.walk, pruning the folders that are not the standard library's own.
    walked = []
    for folder, dirs, found in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "test", "tests", "idle_test")]
        walked += [os.path.relpath(os.path.join(folder, f), root) for f in found if f.endswith(".py")]
    assert names == sorted(walked) and len(names) > 300
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(names)
    assert stdlib.val_files == tuple(names[9::10])  # every tenth file, whole
    assert stdlib.train_files == tuple(n for i, n in enumerate(names) if i % 10 != 9)
    assert bytes(stdlib.val.numpy()) == b"".join((root / n).read_bytes() for n in stdlib.val_files)
    assert len(stdlib.train) == sum((root / n).stat().st_size for n in stdlib.train_files)
    again = corpus.load()
    assert again.val_files == stdlib.val_files and torch.equal(again.train, stdlib.train)


def test_a_data_directory_or_file(tmp_path):
    for i in range(12):
        (tmp_path / "docs" / f"{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / f"{i % 3}" / f"{i:02d}.txt").write_text(f"file {i}: h\u00e9llo\n" * (i + 1))
    (tmp_path / "docs" / ".hidden").write_bytes(b"\xff\xfe not text, and hidden, so never read")
    text = corpus.load(tmp_path / "docs")
    names = sorted(f"{i % 3}/{i:02d}.txt" for i in range(12))
    assert text.val_files == (names[9],) and text.train_files == tuple(names[:9] + names[10:])
    assert bytes(text.val.numpy()) == (tmp_path / "docs" / names[9]).read_bytes()
    one = tmp_path / "one.txt"
    one.write_text("".join(f"line {i}\n" for i in range(100)))
    single = corpus.load(one)
    assert bytes(single.train.numpy()) + bytes(single.val.numpy()) == one.read_bytes()
    assert bytes(single.val.numpy()).startswith(b"line 9") and 0.05 < len(single.val) / len(single.train) < 0.15


def test_unigram_entropy_is_the_cross_entropy_of_byte_frequencies(stdlib):
    counts = np.bincount(stdlib.train.numpy(), minlength=256).astype(np.float64) + 1
    p = counts / counts.sum()
    expected = -np.log2(p[stdlib.val.numpy()]).mean()
    assert stdlib.unigram_entropy() == pytest.approx(expected, rel=1e-12)
    assert 4 < expected < 5.5  # source code: spaces and letters, far from 8 bits


def fails(argv: list[str], capsys) -> str:
    """The CLI in this process exits 2 after one line on stderr; that line."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("python -m distrib.train: error: "), lines
    return lines[0]


def test_each_bad_data_path_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "nul.txt").write_bytes(b"abc\0def")
    (tmp_path / "short.txt").write_text("x = 1\n" * 10)
    cases = [
        (tmp_path / "missing", "missing does not exist: name a UTF-8 text file or a directory of them"),
        (tmp_path / "empty", "empty holds no files"),
        (tmp_path / "empty.txt", "empty.txt leaves no training text (0 bytes in 1 file): give it more text"),
        (tmp_path / "latin1.txt", "latin1.txt is not UTF-8 text (byte 0xe9 on line 1)"),
        (tmp_path / "nul.txt", "nul.txt holds NUL bytes, so it is not text"),
        ("/proc/self/mem", "cannot read /proc/self/mem: Input/output error"),  # readable by name, not by read()
    ]
    for path, message in cases:
        line = fails(["--task", "lm", "--data", str(path), "--out", str(tmp_path / "r")], capsys)
        assert "argument --data: " in line and message in line, line
    line = fails(["--task", "lm", "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "r")], capsys)
    assert "argument --block-size: a window of 128 bytes and its next byte do not fit in the 54 bytes" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--block-size", "64"], "argument --block-size: only --task lm takes --block-size, not 'classify'"),
        (["--task", "gan", "--model-size", "tiny"], "argument --model-size: only --task lm takes --model-size"),
        (["--task", "lm", "--model-size", "huge"], "argument --model-size: invalid choice: 'huge'"),
        (["--task", "lm", "--block-size", "0"], "argument --block-size: must be a positive int, got '0'"),
        (["--task", "rl", "--data", "x.txt"], "only --task classify and lm read --data, not 'rl'"),
    ],
)
def test_lm_options_only_for_lm(argv, message, tmp_path, capsys):
    assert message in fails([*argv, "--out", str(tmp_path / "r")], capsys)


# The model.


def naive_attention(attention: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: scores, a mask above the diagonal, weights, values, then the projection."""
    batch, time, width = x.shape
    heads, size = attention.heads, width // attention.heads
    q, k, v = (attention.qkv(x)[..., i * width : (i + 1) * width].reshape(batch, time, heads, size) for i in range(3))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(size)
    scores = scores.masked_fill(torch.ones(time, time, dtype=torch.bool).triu(1), float("-inf"))
    mixed = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, time, width)
    return attention.proj(mixed)


def reference_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The whole forward from the weights, with layer norm and GELU written out."""

    def norm(x, layer):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    x = model.tokens.weight[ids] + model.positions.weight[: ids.shape[1]]
    for block in model.blocks:
        x = x + naive_attention(block.attention, norm(x, block.norm1))
        fc, proj = block.mlp[0], block.mlp[2]
        x = x + gelu(norm(x, block.norm2) @ fc.weight.T + fc.bias) @ proj.weight.T + proj.bias
    return norm(x, model.norm) @ model.tokens.weight.T


def test_gpt_forward_matches_the_reference():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, layers=2, heads=4, width=32)).double()
    with torch.no_grad():  # weights away from their initial zeros and ones, so every term counts
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(model, ids), rtol=1e-10, atol=1e-10)
        x = torch.randn(3, 16, 32, dtype=torch.float64)
        attention = model.blocks[0].attention
        torch.testing.assert_close(attention(x), naive_attention(attention, x), rtol=1e-10, atol=1e-10)
    assert model.tokens.weight is dict(model.named_parameters())["tokens.weight"]  # the tied head, one tensor


def test_later_tokens_do_not_change_earlier_outputs():
    torch.manual_seed(1)
    model = GPT(preset("tiny", 32))
    ids = torch.randint(0, 256, (2, 32))
    changed = ids.clone()
    changed[:, 20:] = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3  # later outputs do see their own tokens


def test_presets_and_bad_sizes():
    counts = {name: sum(p.numel() for p in GPT(preset(name, 128)).parameters()) for name in PRESETS}
    assert counts["tiny"] < 50_000 and 300_000 < counts["small"] < 600_000
    medium = list(GPT(preset("medium", 128)).parameters())
    assert 18e6 < sum(p.numel() for p in medium) < 22e6 and len(medium) == 100  # the benchmarks' model
    with pytest.raises(ValueError, match="width 30 must divide into 4 heads"):
        GPTConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="20 tokens exceed the block size 16"):
        GPT(preset("tiny", 16))(torch.zeros(1, 20, dtype=torch.int64))


def test_an_untrained_model_scores_about_eight_bits(stdlib):
    task = LanguageModel(corpus=stdlib, size="tiny", block_size=32, val_windows=64)
    with torch.no_grad():
        stats = task.evaluate(task.build(), task.validation())
    assert stats["count"] == 64
    assert stats["bits_per_byte"] / stats["count"] == pytest.approx(8.0, abs=0.1)  # near uniform over 256 bytes
    assert stats["bits_per_byte"] == pytest.approx(stats["loss"] / math.log(2))


def test_a_sample_continues_the_prompt_and_prints_safely(stdlib):
    task = LanguageModel(corpus=stdlib, size="tiny", block_size=16, prompt=b"def ")
    models = task.build()
    text = task.sample(models, length=40)  # longer than the block: generation slides its window
    assert text == task.sample(models, length=40) and text.startswith("def ")  # seeded by the task's seed
    assert "\ufffd" in text  # an untrained model writes any byte; control bytes are never printed as they are
    assert all(c.isprintable() or c in "\n\t" for c in text), repr(text)


# The task through the CLI.


def train_run(tmp_path, ranks: int, *args: str):
    """python -m distrib.train at `ranks` ranks (1: a plain process); its stdout, epochs and weights."""
    out = tmp_path / f"{ranks}-{'-'.join(args).replace(':', '-')}"
    cmd = [*TRAIN, "--out", str(out), *args]
    result = run_ranks("mpiexec", ranks, cmd, timeout=240) if ranks > 1 else run([sys.executable, *cmd], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result.stdout, epochs, torch.load(out / "model.pt", weights_only=True)


def test_lm_learns_at_two_ranks(tmp_path, stdlib):
    # 5 epochs of 128 steps of 32 windows of 64 bytes: about 20 s of compute for the tiny GPT.
    args = ("--task", "lm", "--model-size", "tiny", "--block-size", "64", "--lr", "0.01", "--epochs", "5")
    stdout, epochs, _ = train_run(tmp_path, 2, *args)
    bits = [e["val_bits_per_byte"] for e in epochs]
    # The byte frequencies alone give the unigram entropy (4.8 bits here); a model that has learned context does
    # far better (this run ends near 3.0). Untrained, it scores 8 bits.
    assert bits[-1] < 0.7 * stdlib.unigram_entropy(), bits
    assert all(e["val_count"] == 256 for e in epochs)
    assert stdout.count("sample:\n") == 1  # rank 0 only
    assert len(stdout.split("sample:\n")[1]) >= 300  # the prompt and 300 bytes (fewer characters where not UTF-8)


def tiny_lm(seed: int = 0, text: corpus.Corpus | None = None) -> LanguageModel:
    return LanguageModel(seed=seed, corpus=text, size="tiny", block_size=32, windows=600, val_windows=30)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_one_and_three_ranks_zero_offload_and_accumulation_train_the_same_weights(tmp_path):
    # 2 epochs of 6 optimizer steps on 100 windows each, clipped to norm 1 (the tiny GPT's first gradients are larger:
    # test_clipping_engages); the same math at every world size, sharded or accumulated.
    args = ("--task", "tests.test_lm:tiny_lm", "--epochs", "2", "--clip-grad", "1")
    _, _, one = train_run(tmp_path, 1, *args, "--batch-size", "100")
    assert_same(train_run(tmp_path, 3, *args, "--batch-size", "100")[2], one)
    # ZeRO-Offload with two micro-batches of 50 a step: sharded Adam, accumulated gradients, clipped over shards.
    zero = train_run(tmp_path, 2, *args, "--batch-size", "50", "--accumulation-steps", "2", "--zero-offload")[2]
    assert_same(zero, one)


def test_clipping_engages(stdlib):
    task = tiny_lm(text=stdlib)
    models = task.build()
    batch = [task.collect(0, models, LocalCommunicator())[0][:100]]
    guesses = task.apply("model", models, batch)
    task.loss("model", guesses, task.targets("model", models, batch, guesses)).mean().backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in models["model"].parameters()]) > 1


def test_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_does(stdlib):
    comm, config = LocalCommunicator(), LoopConfig(epochs=2, batch_size=100, seed=3)

    def start(seed: int = 3):
        task = tiny_lm(seed, stdlib)  # a fresh task, as a fresh process would build
        models = task.build()
        optimizers = {"model": torch.optim.Adam(models["model"].parameters(), lr=1e-2)}
        return task, models, optimizers

    task, models, optimizers = start()
    fit(task, models, optimizers, comm, config)
    steps = iter(range(100))
    task, stopped, optimizers_stopped = start()
    progress = Progress()
    with pytest.raises(Stopped):  # a signal after step 8, in the second epoch
        fit(task, stopped, optimizers_stopped, comm, config, progress=progress, stop=lambda: 15 * (next(steps) == 7))
    saved = io.BytesIO()
    torch.save({"model": stopped["model"].state_dict(), "adam": optimizers_stopped["model"].state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    task, resumed, optimizers_resumed = start()
    resumed["model"].load_state_dict(state["model"])
    optimizers_resumed["model"].load_state_dict(state["adam"])
    assert (progress.epoch, progress.step) == (1, 2)
    fit(task, resumed, optimizers_resumed, comm, config, progress=copy.deepcopy(progress))
    for key, value in models["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[key], value), key
