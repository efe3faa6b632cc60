"""Fixtures shared by every tier: the fake clock for unit tests, and the tier markers.

The privileged fixtures (the real kube-apiserver, network namespaces) live in
tests/integration/conftest.py and tests/e2e/conftest.py, close to the tests that need root.
"""

from __future__ import annotations

import pathlib

import pytest

from podwire.agent import clock as clock_mod

TESTS = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The tier is the folder: tests/unit/... is marked unit, and so on, so `-m unit` works.
    for item in items:
        rel = pathlib.Path(str(item.fspath)).resolve().relative_to(TESTS)
        tier = rel.parts[0]
        if tier in {"unit", "integration", "e2e", "kernel"}:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def fake_clock() -> clock_mod.FakeClock:
    """A clock that moves only when the test advances it."""
    return clock_mod.FakeClock()
