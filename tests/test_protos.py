"""The generated Python next to the .proto files is what the pinned protoc makes now."""
from __future__ import annotations

import filecmp
import os

from slora.protos import codegen


def test_generated_code_is_fresh(tmp_path):
    fresh = codegen.generate(str(tmp_path))
    assert fresh, "protoc generated nothing"
    for path in fresh:
        name = os.path.basename(path)
        checked_in = os.path.join(codegen.PROTO_DIR, name)
        assert os.path.exists(checked_in), f"{name} is not checked in: run python -m slora.protos.codegen"
        assert filecmp.cmp(path, checked_in, shallow=False), (
            f"{name} is stale: run python -m slora.protos.codegen")
