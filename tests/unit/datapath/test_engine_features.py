"""The engine's features file, as the agent reads it for its status: what the engine publishes
comes out as `engine:<name>`, and a missing or malformed file says the features are unknown
rather than crash the agent or put garbage in its status."""

from __future__ import annotations

import pathlib

import pytest

from podwire.agent.datapath import uapi


def _client(tmp_path: pathlib.Path) -> uapi.UapiClient:
    return uapi.UapiClient("wgx", socket_dir=tmp_path)


def test_the_engines_features_are_named_engine(tmp_path: pathlib.Path) -> None:
    (tmp_path / "wgx.features").write_text(
        '{"fast_path": "native_fastpath", "offloads": ["vnet_hdr", "udp_gso"]}\n'
    )
    assert _client(tmp_path).engine_features() == (
        "engine:native_fastpath",
        "engine:vnet_hdr",
        "engine:udp_gso",
    )


def test_a_missing_file_means_unknown(tmp_path: pathlib.Path) -> None:
    assert _client(tmp_path).engine_features() == ("engine:unknown",)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b'{"fast_path": "native_fastpath", "offloads": ["udp_g',  # cut short
        b"\xff\xfe not utf-8",
        b"[]",
        b"null",
        b'{"fast_path": "native_fastpath"}',
        b'{"fast_path": "native_fastpath", "offloads": "udp_gso"}',
        b'{"fast_path": 3, "offloads": []}',
        b'{"fast_path": "x", "offloads": ["udp_gso, secret=abc"]}',
        b'{"fast_path": "x", "offloads": ["\\u00e9t\\u00e9"]}',
        b"[" * 100_000,
    ],
)
def test_a_malformed_file_means_unknown(tmp_path: pathlib.Path, text: bytes) -> None:
    (tmp_path / "wgx.features").write_bytes(text)
    assert _client(tmp_path).engine_features() == ("engine:unknown",)


def test_a_directory_in_its_place_means_unknown(tmp_path: pathlib.Path) -> None:
    (tmp_path / "wgx.features").mkdir()
    assert _client(tmp_path).engine_features() == ("engine:unknown",)
