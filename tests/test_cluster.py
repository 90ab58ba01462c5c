"""Several hosts on shaped links: 2 hosts x 2 ranks and 4 hosts x 1 rank, each host's link at a set rate and delay.

One job per layout runs under mpiexec across the namespaces (tests/netns.py, tests/wire.py) and checks every
algorithm that crosses hosts ("auto" too) on allreduce, reduce-scatter and allgather against exact float64 sums,
reports what "auto" picks under a cost model written for the test, and trains: the weights must be those of one
process. Afterwards no namespace, link or qdisc of the cluster may remain.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from distrib.comm.local import LocalCommunicator
from tests import netns
from tests.hostjobs import finish, job_env, start
from tests.launching import ROOT
from tests.scripts.two_hosts_train import train

TRAIN = "tests/scripts/two_hosts_train.py"
JOB_SECONDS = 150
LAYOUTS = {"2x2": (2, 2, netns.Link(gbit=1.0, delay_us=100)), "4x1": (4, 1, netns.Link(gbit=2.0, delay_us=250))}
# A model for the test: ring pays 1 ms a message between hosts and nothing a byte; halving-doubling nothing a
# message and 1 ns a byte. Ring sends 2(n-1) = 6 messages one after another, 6 ms at any size. Halving-doubling's
# busiest host link carries, at 2x2, N in its first step (both ranks of a host send their half) and N in its last,
# 2N in all; at 4x1 N/2 + N/4 each way, 1.5N. So it is faster below 3 MB (2x2) and 4 MB (4x1), ring above.
MODEL = {
    "ring": {"intra": {"alpha": 0.0, "beta": 0.0}, "inter": {"alpha": 1e-3, "beta": 0.0}},
    "halving_doubling": {"intra": {"alpha": 0.0, "beta": 0.0}, "inter": {"alpha": 0.0, "beta": 1e-9}},
}
PICKS = {"2x2": {2_900_000: "halving_doubling", 3_100_000: "ring"}, "4x1": {3_900_000: "halving_doubling",
                                                                           4_100_000: "ring"}}  # fmt: skip
DONE = re.compile(r"rank (\d) of (\d) in (net:\[\d+\]): allreduce and training done")


@pytest.fixture(params=sorted(LAYOUTS))
def shaped(request):
    """(layout name, cluster): the layout's hosts on their shaped links; checks afterwards that nothing remains."""
    reason = netns.unavailable(shaped=True)
    if reason:
        pytest.skip(f"shaped hosts need network namespaces and tc: {reason}")
    hosts, _, link = LAYOUTS[request.param]
    with netns.cluster(hosts, link) as made:
        assert all(made.qdiscs(h) == ["tbf", "tbf"] for h in range(hosts)), [made.qdiscs(h) for h in range(hosts)]
        yield request.param, made
    assert netns.leftovers(made) == [], netns.leftovers(made)


def test_every_algorithm_exact_auto_follows_the_model_and_training_equals_one_process(shaped, tmp_path):
    layout, made = shaped
    hosts, per_host, _ = LAYOUTS[layout]
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"algorithms": MODEL}))
    out, log = tmp_path / "weights.pt", tmp_path / "job.log"
    launch = [sys.executable, "-m", "launch", "-n", str(hosts * per_host), "--hosts", made.hosts_arg(per_host)]
    script = [
        "python",
        TRAIN,
        "mpi",
        str(out),
        "--check-all",
        "--algorithm",
        "auto",
        "--picks",
        *map(str, PICKS[layout]),
    ]
    before = made.link_bytes()
    env = job_env(made, DISTRIB_COST_MODEL=str(model))
    proc = start([*made.exec_prefix(0), *launch, "--", *script], env, log)
    (text,) = finish([proc], [log], JOB_SECONDS)
    assert proc.returncode == 0, text[-4000:]
    where = {int(rank): ns for rank, _, ns in DONE.findall(text)}
    assert sorted(where) == list(range(hosts * per_host)), text[-4000:]
    assert [where[r] for r in sorted(where)] == [made.netns_id(r // per_host) for r in sorted(where)], where
    assert made.link_bytes() - before > 8 * 100_000, "the ranks did not talk over host 0's link"
    picks = {int(size): name for size, name in re.findall(r"auto (\d+) -> (\w+)", text)}
    assert picks == PICKS[layout], picks
    reference = train(LocalCommunicator(), steps=5, pause=0.0).state_dict()
    weights = torch.load(out)
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_torchrun_per_host_gloo_on_shaped_links(tmp_path):
    """2 hosts x 2 ranks under one torchrun per host (gloo): every algorithm exact, sub-groups made by new_group."""
    reason = netns.unavailable(shaped=True)
    if reason:
        pytest.skip(f"shaped hosts need network namespaces and tc: {reason}")
    out = tmp_path / "weights.pt"
    with netns.cluster(2, LAYOUTS["2x2"][2]) as made:
        procs, logs = [], []
        for host in (0, 1):
            env = job_env(made, PET_RDZV_CONF=f"is_host={int(host == 0)}", PET_LOCAL_ADDR=netns.address(host))
            command = [sys.executable, "-m", "launch", "-n", "4", "--hosts", made.hosts_arg(2), "--via", "torchrun"]
            command += ["--node-rank", str(host), "--rdzv-endpoint", f"{netns.address(0)}:29500"]
            command += ["--", "python", TRAIN, "gloo", str(out), "--check-all", "--algorithm", "hierarchical"]
            logs.append(tmp_path / f"host{host}.log")
            procs.append(start([*made.exec_prefix(host), *command], env, logs[-1]))
        texts = finish(procs, logs, JOB_SECONDS)
        assert [proc.returncode for proc in procs] == [0, 0], "\n".join(text[-3000:] for text in texts)
    assert netns.leftovers(made) == [], netns.leftovers(made)
    assert len(DONE.findall("".join(texts))) == 4, texts
    reference = train(LocalCommunicator(), steps=5, pause=0.0).state_dict()
    weights = torch.load(out)
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7, msg=name)


SAVED = ROOT / "benchmarks/results/cost_model.json"  # python -m benchmarks.model ... --save, from shaped runs


@pytest.mark.skipif(not SAVED.exists(), reason="no saved fit: run benchmarks.shaped, then benchmarks.model --save")
def test_auto_picks_what_the_saved_fit_says(shaped, tmp_path):
    """The job finds its hosts in the namespaces and picks, at each measured size, what the fit chose for them."""
    layout, made = shaped
    hosts, per_host, _ = LAYOUTS[layout]
    expected = {int(size): name for size, name in json.loads(SAVED.read_text())["choices"][layout].items()}
    log = tmp_path / "job.log"
    launch = [sys.executable, "-m", "launch", "-n", str(hosts * per_host), "--hosts", made.hosts_arg(per_host)]
    script = ["python", TRAIN, "mpi", str(tmp_path / "w.pt"), "--steps", "1", "--picks", *map(str, expected)]
    proc = start([*made.exec_prefix(0), *launch, "--", *script], job_env(made, DISTRIB_COST_MODEL=str(SAVED)), log)
    (text,) = finish([proc], [log], JOB_SECONDS)
    assert proc.returncode == 0, text[-4000:]
    assert {int(size): name for size, name in re.findall(r"auto (\d+) -> (\w+)", text)} == expected
