"""A deadline that cannot be switched off: every source of the collective timeout takes finite positive seconds
only, and says which source and which value it refused in one line. NaN passed `<= 0` and `waited > nan` is never
true, so NaN or inf used to let a stopped rank hang a job forever. (And DISTRIB_VERIFY, the other setting of the
communication layer read from the environment, says its bad values in one line too.)"""

from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

import distrib
from distrib import train
from distrib.comm.contract import MAX_TIMEOUT, check_timeout, env_timeout
from distrib.comm.local import LocalCommunicator
from distrib.comm.torch_dist import TorchCommunicator
from tests.launching import ERROR, run_ranks

BAD = ["nan", "inf", "-inf", "-1", "0", "abc", "", str(MAX_TIMEOUT * 10)]
REFUSED = "is not a deadline: give a finite number of seconds above 0 and at most 1e+06 (default 300)"


@pytest.mark.parametrize("value", BAD)
def test_distrib_timeout_variable(monkeypatch, value):
    monkeypatch.setenv("DISTRIB_TIMEOUT", value)
    with pytest.raises(ValueError) as error:
        env_timeout()
    assert str(error.value) == f"DISTRIB_TIMEOUT={value!r} {REFUSED}"
    with pytest.raises(ValueError, match="DISTRIB_TIMEOUT="):
        LocalCommunicator()


@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 0, "abc", True])
@pytest.mark.parametrize(
    "make,source",
    [
        (lambda v: distrib.init(timeout=v), "distrib.init(timeout={!r})"),
        (lambda v: LocalCommunicator(timeout=v), "LocalCommunicator(timeout={!r})"),
        (lambda v: TorchCommunicator("gloo", 0, 1, timeout=v), "TorchCommunicator(timeout={!r})"),
    ],
    ids=["init", "Communicator", "TorchCommunicator"],
)
def test_timeout_arguments(make, source, value):
    with pytest.raises(ValueError) as error:
        make(value)
    assert str(error.value) == f"{source.format(value)} {REFUSED}"
    assert not dist.is_initialized()  # refused before torch saw it: no "cannot convert float NaN to integer"


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 0, timedelta(seconds=-1), timedelta(0)])
def test_init_process_group_timeout(value):
    with pytest.raises(ValueError) as error:
        distrib.init_process_group(timeout=value)
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    assert str(error.value) == f"init_process_group(timeout={seconds!r}) {REFUSED}"


def test_good_timeouts_pass():
    assert check_timeout("7.5", "x") == 7.5 and check_timeout(MAX_TIMEOUT, "x") == MAX_TIMEOUT
    assert LocalCommunicator(timeout=timedelta(seconds=3).total_seconds()).timeout == 3


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "abc"])
def test_timeout_option_and_variable_exit_2_with_one_line(value, monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as status:
        train.main(["--timeout", value, "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status.value.code == 2 and lines == [
        f"python -m distrib.train: error: argument --timeout: {value!r} {REFUSED}"
    ]
    monkeypatch.setenv("DISTRIB_TIMEOUT", value)
    with pytest.raises(SystemExit) as status:
        train.main(["--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status.value.code == 2 and lines == [f"{ERROR}DISTRIB_TIMEOUT={value!r} {REFUSED}"]
    assert not out.exists()


@pytest.mark.parametrize("backend", ["mpi", "gloo"])
def test_a_job_configured_with_inf_cannot_be_hung_by_a_stopped_rank(backend):
    """With DISTRIB_TIMEOUT=inf a SIGSTOPped rank used to hang the job forever; now the job refuses the value at
    start, on every rank, before any collective (gloo used to say 'cannot convert float NaN to integer' for nan)."""
    start = time.monotonic()
    for value in ("inf", "nan"):
        result = run_ranks("mpiexec", 2, ["tests/ranks/scenarios.py", "stopped", backend, "env", "ring"], timeout=60,
                           env={"DISTRIB_TIMEOUT": value})  # fmt: skip
        text = result.stdout + result.stderr
        assert result.returncode != 0, text[-3000:]
        assert f"ValueError: DISTRIB_TIMEOUT={value!r} {REFUSED}" in text, text[-3000:]
        assert "cannot convert" not in text and "rank 1 caught" not in text
    assert time.monotonic() - start < 45


def test_the_cli_refuses_them_once_on_every_rank():
    """Under mpiexec, `--timeout inf` and DISTRIB_TIMEOUT=nan with gloo: exit 2 and the one line, said once."""
    for args, env, line in [
        (["--timeout", "inf"], {}, f"argument --timeout: 'inf' {REFUSED}"),
        (["--backend", "gloo"], {"DISTRIB_TIMEOUT": "nan"}, f"DISTRIB_TIMEOUT='nan' {REFUSED}"),
    ]:
        result = run_ranks("mpiexec", 2, ["-m", "distrib.train", *args], timeout=60, env=env)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [ERROR + line], result.stderr


def test_an_unknown_check_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DISTRIB_VERIFY", "some")
    with pytest.raises(SystemExit) as status:
        train.main(["--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status.value.code == 2 and lines == [
        f"{ERROR}DISTRIB_VERIFY='some' is not a check: use one of fingerprint, all, off"
    ], lines
