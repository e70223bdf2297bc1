#!/usr/bin/env python3
"""Regenerates the gRPC stubs in shim/_proto from proto/api.proto.

    python scripts/gen_proto.py          # rewrite the committed stubs
    python scripts/gen_proto.py --check  # exit 1 if they are stale

The output depends only on the proto and the pinned grpcio-tools version
(pyproject.toml, test extra), so a fresh run reproduces the committed bytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "shim" / "_proto"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def generate(out: Path) -> None:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_DIR / "api.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes a top-level import; the stubs live in a package.
    grpc_file = out / "api_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import api_pb2 as", "from . import api_pb2 as"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    opts = parser.parse_args()
    if not opts.check:
        generate(OUT_DIR)
        print(f"wrote {', '.join(GENERATED)} to {OUT_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = [
            name
            for name in GENERATED
            if not (OUT_DIR / name).exists() or (OUT_DIR / name).read_bytes() != (fresh / name).read_bytes()
        ]
    if stale:
        print(f"stale stubs: {', '.join(stale)}; run python scripts/gen_proto.py", file=sys.stderr)
        return 1
    print("stubs are fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
