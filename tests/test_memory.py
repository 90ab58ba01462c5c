"""Freed host memory kept for the next tensors (distrib/memory.py), against glibc's own policy."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from distrib import train
from distrib.memory import keep_freed_memory, wanted
from tests.launching import ERROR

# 40 MiB tensors made and freed in turn: above glibc's largest adaptive threshold (32 MiB), so by its own policy
# each gets a mapping of its own, unmapped at free, and every one of its 10240 pages faults again the next time.
TIMES = 10
ROUNDS = f"""
import resource, torch, distrib
distrib.init()
faults = []
for _ in range({TIMES}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(10 << 20)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults))
"""
PAGES = (40 << 20) // 4096  # one tensor, at 4 KiB a page


def faults(keep: str) -> int:
    env = {**os.environ, "DISTRIB_KEEP_MEMORY": keep}
    done = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc policy is the reference")
def test_init_keeps_freed_tensors_pages_for_the_next_ones_and_0_leaves_malloc_alone():
    kept, alone = faults("1"), faults("0")
    assert alone > 0.9 * TIMES * PAGES, alone  # glibc's own policy: every round faults its tensor in afresh
    assert kept < 3.1 * PAGES, kept  # kept: after the heap has grown (once or twice), the rounds reuse its pages


def test_a_bad_switch_is_an_error_naming_it(monkeypatch, capsys, tmp_path):
    message = "DISTRIB_KEEP_MEMORY='yes' is not a switch: 1 (the default) or 0 (malloc's own policy)"
    for call in (wanted, keep_freed_memory):
        with pytest.raises(ValueError) as error:
            call({"DISTRIB_KEEP_MEMORY": "yes"})
        assert str(error.value) == message
    monkeypatch.setenv("DISTRIB_KEEP_MEMORY", "yes")
    with pytest.raises(SystemExit) as status:
        train.main(["--out", str(tmp_path / "run")])
    assert status.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"{ERROR}{message}"]
