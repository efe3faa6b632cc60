"""Generates the Python modules for proto/podwire/v1/*.proto.

The generated modules are committed so that installing podwire needs no protoc; the unit
suite regenerates them into a temporary folder and fails when the committed ones are stale.
Usage: python hack/genproto.py [OUTDIR]   (default: write into proto/ in place)
"""

from __future__ import annotations

import importlib.resources
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the generated modules under out_dir/podwire/v1 and returns their paths."""
    from grpc_tools import protoc  # a test dependency: only this script needs it

    protos = sorted(PROTO_DIR.glob("podwire/v1/*.proto"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # The virtual path podwire/api=proto makes the generated imports read
        # `from podwire.api.podwire.v1 import ...`, which is where the modules are installed.
        args = [
            "protoc",
            f"-I{well_known}",
            f"-Ipodwire/api={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ] + [f"podwire/api/{p.relative_to(PROTO_DIR)}" for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        produced = sorted((pathlib.Path(tmp) / "podwire/api/podwire/v1").glob("*_pb2*"))
        target = out_dir / "podwire" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for f in produced:
            shutil.copy(f, target / f.name)
            written.append(target / f.name)
        return written


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for path in generate(out):
        print(path)
