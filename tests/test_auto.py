"""The cost model behind algorithm="auto": each schedule's counts against the textbook by hand, the choice it makes,
and a bad model file refused in one line. (Under real launchers: tests/ranks/test_collectives.py and
tests/test_cluster.py.)"""

from __future__ import annotations

import json
import math

import pytest

from distrib.comm import auto


@pytest.mark.parametrize("hosts,per_host", [(1, 2), (1, 4), (4, 1), (3, 1), (64, 8)])
def test_ring_is_two_n_minus_one_steps_of_one_nth(hosts, per_host):
    n = hosts * per_host
    s = auto.shape("ring", hosts, per_host)
    link = ("a_inter", "b_inter") if hosts > 1 else ("a_intra", "b_intra")
    assert (getattr(s, link[0]), getattr(s, link[1])) == pytest.approx((2 * (n - 1), 2 * (n - 1) / n))


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_halving_doubling_one_rank_a_host_is_rabenseifner(n):
    """2 log2(n) messages, and the ring's 2(n-1)/n of the tensor through each host's link."""
    s = auto.shape("halving_doubling", n, 1)
    assert (s.a_inter, s.b_inter) == pytest.approx((2 * math.log2(n), 2 * (n - 1) / n))


def test_halving_doubling_folds_a_world_that_is_no_power_of_two():
    """At 6 ranks: ranks 0-3 fold in pairs, 4 participants halve and double, then the pairs unfold: 2 + 2 log2(4)
    steps; the folds move the whole tensor, the rest 2(4-1)/4 of it."""
    s = auto.shape("halving_doubling", 6, 1)
    assert (s.a_inter, s.b_inter) == pytest.approx((6, 2 + 1.5))


def test_hierarchical_sends_a_hosts_share_across_in_few_steps():
    """8 hosts of 4: rings of 4 inside (2 x 3 steps of 1/4), halving-doubling of a quarter across by all 4 local
    ranks at once: 2 log2(8) steps, 2(8-1)/8 of the tensor through each host's link."""
    s = auto.shape("hierarchical", 8, 4)
    assert (s.a_intra, s.b_intra, s.a_inter, s.b_inter) == pytest.approx((6, 1.5, 6, 1.75))


def test_halving_doubling_on_hosts_of_several_ranks_crowds_the_links():
    """2 hosts of 2: the first halving step pairs ranks across hosts, and both of a host's ranks send their half
    over its one link at once: N through it, then N again in the last doubling step."""
    s = auto.shape("halving_doubling", 2, 2)
    assert (s.a_inter, s.b_inter, s.a_intra, s.b_intra) == pytest.approx((2, 2, 2, 0.5))


def test_fastest_follows_the_crossover():
    """Ring at 1 ms a message and free bytes against halving-doubling at free messages and 1 ns a byte, on 4 hosts:
    6 ms against 1.5 N ns, equal at N = 4 MB."""
    model = {
        "ring": {"inter": {"alpha": 1e-3, "beta": 0.0}},
        "halving_doubling": {"inter": {"alpha": 0.0, "beta": 1e-9}},
    }
    options = ["ring", "halving_doubling", "native"]  # native has no figures here: never chosen
    assert auto.fastest(model, options, 3.9e6, 4, 1, "mpi") == "halving_doubling"
    assert auto.fastest(model, options, 4.1e6, 4, 1, "mpi") == "ring"
    assert auto.fastest({}, options, 1e6, 4, 1, "mpi") == "native"


def test_without_a_model_file_small_calls_go_to_the_library(monkeypatch):
    """The built-in figures give the library's own collective ~10 us less per message than Python's: below 64 KiB
    it wins on every layout; where the bytes count, an algorithm written here may."""
    monkeypatch.delenv(auto.ENV, raising=False)
    assert auto.load("") is auto.DEFAULT_MODEL
    for hosts, per_host in [(1, 2), (2, 2), (4, 1), (64, 8), (512, 8)]:
        assert auto.fastest(auto.DEFAULT_MODEL, auto.options(hosts, per_host), 4096, hosts, per_host, "mpi") == "native"
    assert auto.fastest(auto.DEFAULT_MODEL, auto.options(64, 8), 1 << 20, 64, 8, "mpi") == "hierarchical"


@pytest.mark.parametrize(
    "content,problem",
    [(None, "FileNotFoundError"), ("{", "JSONDecodeError"), ('{"algorithms": {"ring": {"wan": {}}}}', "ring wan")],
)
def test_a_bad_model_file_is_one_line(content, problem, tmp_path):
    path = tmp_path / "model.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as error:
        auto.load(str(path))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and problem in message, message
    assert f"DISTRIB_COST_MODEL={path} is not a cost model" in message and "benchmarks.model --save" in message


def test_a_saved_model_loads(tmp_path):
    model = {"ring": {"intra": {"alpha": 1e-5, "beta": 2e-10}}}
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"algorithms": model, "link": "anything else is ignored"}))
    assert auto.load(str(path)) == model
    assert auto.predict(model, "ring", 1e6, 1, 2) == pytest.approx(2 * 1e-5 + 1 * 1e6 * 2e-10)


def test_mpich_native_on_hosts_of_several_ranks_goes_through_one_leader_a_host():
    """2 hosts of 2: a reduce to the leader (one step of N inside), halving-doubling between the 2 leaders (2 steps
    of N/2 through the link), a broadcast inside (one step of N); gloo's native is a ring."""
    assert auto.shape("native", 2, 2, "mpi") == auto.Shape(a_intra=2, b_intra=2, a_inter=2, b_inter=1)
    assert auto.shape("native", 2, 2, "gloo") == auto.shape("ring", 2, 2)
    assert auto.shape("native", 4, 1, "mpi") == auto.shape("halving_doubling", 4, 1)
