"""The multi-rank suites under tests/ranks run only when a launcher starts them (see tests/launching.py)."""

import os

collect_ignore_glob = [] if os.environ.get("DISTRIB_RANK_SUITE") else ["ranks/*"]
