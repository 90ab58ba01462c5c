"""The communicator the rank suites share: the backend comes from DISTRIB_TEST_BACKEND (default: the launcher's)."""

import os

import pytest

import distrib


@pytest.fixture(scope="session")
def comm() -> distrib.Communicator:
    return distrib.init(os.environ.get("DISTRIB_TEST_BACKEND") or None, timeout=60)
