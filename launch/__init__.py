"""python -m launch: start N ranks of a program through mpirun, torchrun or srun, on one host or many.

It only builds the command line for a launcher that is already installed (it never imports torch), then
becomes that launcher, so the job's exit status is the launcher's.
"""

from launch.commands import build
from launch.job import Host, Job, UsageError

__all__ = ["Host", "Job", "UsageError", "build"]
