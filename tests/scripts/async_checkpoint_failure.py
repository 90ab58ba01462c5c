"""One rank's background checkpoint write fails; every rank must hear of it, at the next checkpoint or at the end.

Usage (on 2+ ranks): async_checkpoint_failure.py DIR FAILING_RANK REPORTS. Each rank writes REPORTS/rank-N.json
(ranks' stdout can share a line): for each case, the CheckpointError it raised (or null), and what DIR held after.
"""

import errno
import json
import sys
from pathlib import Path

import torch

import distrib
from distrib.checkpoint import Checkpointer, CheckpointError, TrainingState, atomic
from distrib.loop import Progress

directory, failing, reports = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
comm = distrib.init()
model = torch.nn.Linear(4, 2)
state = TrainingState({"model": model}, {"model": torch.optim.SGD(model.parameters(), lr=0.1)}, {}, Progress(), {})
real_write = atomic.write


def full_disk(path, obj):
    if comm.rank == failing and state.progress.total % 2 == 1:  # odd steps fail on that rank
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_write(path, obj)


atomic.write = full_disk
saver = Checkpointer(directory, comm, state, keep=10, background=True)
report = {"rank": comm.rank}
for case, then in (("next checkpoint", saver.save), ("end", saver.finish)):
    state.progress.total += 1  # step 1, then step 3: both fail on `failing`, in the thread
    saver.save()
    state.progress.total += 1
    try:
        then()  # step 2's checkpoint waits for step 1's, which failed: raised here, and step 2 is not taken
        report[case] = None
    except CheckpointError as error:
        report[case] = str(error)
saver.save()  # step 4 writes fine
saver.finish()
report["published"] = sorted(p.name for p in directory.iterdir() if not p.name.endswith(".partial"))
(reports / f"rank-{comm.rank}.json").write_text(json.dumps(report))
