"""Regenerates the Python next to the .proto files: `python -m slora.protos.codegen`.

Pinned to grpcio-tools 1.84.0 (the `test` extra), whose code runs on grpcio >= 1.84 and
protobuf >= 7.35; tests/test_protos.py fails when the checked-in files are stale.
"""
from __future__ import annotations

import glob
import os
import sys

PROTO_ROOT = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(PROTO_ROOT, "slora", "v1")


def generate(out_root: str = PROTO_ROOT) -> list[str]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_root/slora/v1; returns them."""
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "*.proto")))
    os.makedirs(os.path.join(out_root, "slora", "v1"), exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return sorted(glob.glob(os.path.join(out_root, "slora", "v1", "*_pb2*.py*")))


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
