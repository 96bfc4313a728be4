"""Shared fixtures: a real omnistream server on an ephemeral port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server import RunningServer, run_server


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One server per test module with default settings (embedded models)."""
    with run_server() as srv:
        yield srv
