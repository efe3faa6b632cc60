"""The fixture that runs a test on both of the engine's fast paths (agent/engine/fastpath.py):
the C extension, which CI builds, and the pure-Python twin. The engine's unit and I/O tiers
import it into their conftest, which makes it autouse there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from podwire.agent.engine import fastpath


@pytest.fixture(autouse=True, params=["native", "python"])
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test of the tier runs on both fast paths, in this process and in any engine a
    test starts. A machine where the extension is not built fails the native runs rather than
    skip them."""
    native = request.param == "native"
    if native and not fastpath.native_available():
        pytest.fail(f"the native fast path is not built: {fastpath.unavailable_reason}")
    before = fastpath.name == fastpath.NATIVE_NAME
    if native:
        monkeypatch.delenv(fastpath.ENV, raising=False)
    else:
        monkeypatch.setenv(fastpath.ENV, "off")
    fastpath.select(native)
    yield request.param
    fastpath.select(before)
