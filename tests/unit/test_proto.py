"""The committed gRPC modules are what the .proto files generate today."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _genproto():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "hack" / "genproto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_not_stale(tmp_path: pathlib.Path) -> None:
    written = _genproto().generate(tmp_path)
    assert written, "no .proto file was compiled"
    for fresh in written:
        committed = ROOT / "proto" / "podwire" / "v1" / fresh.name
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale: run `make proto`"
        )


def test_api_messages_carry_no_private_key_field() -> None:
    from podwire.api.podwire.v1 import agent_pb2

    for message in agent_pb2.DESCRIPTOR.message_types_by_name.values():
        for f in message.fields:
            assert "private" not in f.name, f"{message.name}.{f.name} would carry a secret"
