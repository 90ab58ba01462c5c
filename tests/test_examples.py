"""Every script in examples/ runs as it is, at 1 to 3 ranks, and does what its docstring says: the DDP script
differs from torch's by two import lines and trains under mpirun the weights torch's DDP trains under torchrun,
ZeRO-Offload trains the same weights again, the custom task learns through python -m distrib.train, and the
collectives give their sums."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch

from tests.launching import ROOT, run_ranks

EXAMPLES = ROOT / "examples"
# The two lines that differ, as ddp_torch_style.py's docstring shows them: distrib's, then torch's.
DDP_LINES = "from {} import DistributedDataParallel as DDP"
SWAPS = {
    DDP_LINES.format("distrib"): DDP_LINES.format("torch.nn.parallel"),
    "from distrib import init_process_group": "from torch.distributed import init_process_group",
}


def trained(launcher: str, ranks: int, script, out, torchs: bool = False) -> tuple[str, dict[str, torch.Tensor]]:
    """Run an example script at `ranks` ranks; its output and the weights rank 0 saved. `torchs`: a script of torch
    alone, the reference, whose gloo worker threads now and then abort its process at interpreter teardown, after
    every rank has passed the final barrier (so after the weights are saved): that exit is torch's, not tested."""
    result = run_ranks(launcher, ranks, [str(script), str(out)], timeout=120)
    output = result.stdout + result.stderr
    torn = torchs and "terminate called without an active exception" in output and out.exists()
    assert result.returncode == 0 or torn, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout, torch.load(out, weights_only=True)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tolerance, atol=tolerance, msg=lambda m, k=key: f"{k}: {m}")


def validation_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"validation loss ([\d.]+)", stdout)]


@pytest.fixture(scope="module")
def ddp_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """examples/ddp_torch_style.py under mpirun, 2 ranks: it learns (the targets' variance is 0.43)."""
    stdout, weights = trained("mpiexec", 2, EXAMPLES / "ddp_torch_style.py", tmp_path_factory.mktemp("ddp") / "m.pt")
    losses = validation_losses(stdout)
    assert len(losses) == 4 and losses[-1] < 0.1, stdout  # one line an epoch, from rank 0 only
    return weights


def test_ddp_example_is_torchs_script_but_for_two_imports(ddp_weights, tmp_path):
    source = (EXAMPLES / "ddp_torch_style.py").read_text()
    docstring = ast.get_docstring(ast.parse(source))
    code = source[source.index('"""', 3) + 3 :]
    for ours, torchs in SWAPS.items():
        assert f"\n    {ours}\n" in docstring and f"\n    {torchs}\n" in docstring  # shown as they are
        assert code.count(ours) == 1
        code = code.replace(ours, torchs)
    assert not re.search(r"\bdistrib\b", _without_comments(code))  # distrib by its imports only
    torch_script = tmp_path / "torch_ddp.py"
    torch_script.write_text(code)
    _, torch_weights = trained("torchrun", 2, torch_script, tmp_path / "torch.pt", torchs=True)  # torch's own DDP
    assert_same(ddp_weights, torch_weights, 1e-6)  # distrib's under mpirun: the same weights


def _without_comments(code: str) -> str:
    return "\n".join(line.split("#")[0] for line in code.splitlines())


def test_zero_offload_example_trains_the_ddp_examples_weights(ddp_weights, tmp_path):
    stdout, weights = trained("mpiexec", 2, EXAMPLES / "zero_offload.py", tmp_path / "zero.pt")
    assert validation_losses(stdout)[-1] < 0.1, stdout
    assert_same(weights, ddp_weights, 1e-5)  # sharded CPU AdamW, the same math as torch's AdamW under DDP


def test_custom_task_trains_through_the_cli(tmp_path):
    args = ["-m", "distrib.train", "--task", "examples.custom_task:make_task", "--no-progress", "--out", str(tmp_path)]
    result = run_ranks("mpiexec", 2, args, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 8  # the task's own default epochs
    # sin(3x) varies by 0.5 over [-2, 2] and the noise floor is 0.01: a tenth of the variance shows the curve learned.
    assert epochs[-1]["val_loss"] < 0.05 and epochs[-1]["val_count"] == 1024, epochs[-1]


def test_collectives_example():
    ranks = 3  # an odd world size: reduce_scatter's parts and the ring's steps do not pair up
    result = run_ranks("mpiexec", ranks, [str(EXAMPLES / "collectives.py")], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]  # its asserts check every result against the sums
    # Ranks print at once, so lines may share a line of output: find each rank's report.
    reports = re.findall(rf"rank (\d) of {ranks}: allreduce (\d+),", result.stdout)
    assert sorted(reports) == [(str(r), str(ranks * (ranks + 1) // 2)) for r in range(ranks)], result.stdout
