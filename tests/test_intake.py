"""Spec of safe intake, below the servers: which paths registration by path may read
(adapter roots, `..`, symlinks, the store itself), what is copied (regular files only,
bounded), and the safetensors header check on hostile files."""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from slora.adapter_store.intake import AdapterRoots, copy_adapter_files
from slora.adapter_store.safetensors_check import SafetensorsHeaderError, check_safetensors
from slora.common.errors import (
    AdapterError, InvalidRequestError, PathNotAllowedError, UploadTooLargeError,
)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TINY_DATA = b"\0" * 16
"""The data section of the weights of the tree's folders: one 2x2 float32 tensor."""


@pytest.fixture
def tree(tmp_path):
    """root/ok (a folder with both files), outside/ok, store/ok; root/inner-link -> root/ok
    (a link that stays inside), root/out-link -> outside/ok."""
    for where in ("root", "outside", "store"):
        folder = tmp_path / where / "ok"
        folder.mkdir(parents=True)
        (folder / CONFIG).write_text("{}")
        write_safetensors(folder / WEIGHTS, {"a": entry()}, TINY_DATA)
    os.symlink(tmp_path / "root" / "ok", tmp_path / "root" / "inner-link")
    os.symlink(tmp_path / "outside" / "ok", tmp_path / "root" / "out-link")
    return tmp_path


def roots_of(tree) -> AdapterRoots:
    return AdapterRoots([str(tree / "root"), str(tree / "store")], str(tree / "store"))


@pytest.mark.parametrize("rel, allowed", [
    ("root/ok", True), ("root/inner-link", True), ("root/../outside/ok", False),
    ("root/out-link", False), ("outside/ok", False), ("store/ok", False),
    ("root/missing/../../outside/ok", False), ("rootish/ok", False), ("root/not-there", True),
])
def test_a_path_is_allowed_only_if_its_real_path_is_inside_a_root(tree, rel, allowed):
    """Resolved with `..` and symlinks; the store is out even when a root contains it; a
    sibling whose name starts like a root is out; a missing path inside is allowed (and
    fails later as missing), outside it is refused the same as an existing one."""
    path = str(tree / rel) if ".." not in rel else os.path.join(str(tree), rel)
    if allowed:
        assert roots_of(tree).resolve_folder(path)
    else:
        with pytest.raises(PathNotAllowedError, match="outside the adapter roots"):
            roots_of(tree).resolve_folder(path)


def test_relative_and_empty_paths_are_invalid_and_no_roots_means_no_path_registration(tree):
    with pytest.raises(InvalidRequestError, match="relative"):
        roots_of(tree).resolve_folder("root/ok")
    with pytest.raises(InvalidRequestError):
        roots_of(tree).resolve_folder("")
    with pytest.raises(PathNotAllowedError, match="registration by path is off"):
        AdapterRoots([]).resolve_folder(str(tree / "root" / "ok"))


def test_a_file_linked_out_of_the_root_is_refused_once_opened(tree, tmp_path):
    folder = tree / "root" / "half"
    folder.mkdir()
    shutil.copy(tree / "root" / "ok" / CONFIG, folder)
    os.symlink(tree / "outside" / "ok" / WEIGHTS, folder / WEIGHTS)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(PathNotAllowedError):
        copy_adapter_files("a", str(folder), str(dst), roots_of(tree), None)


def test_fifos_are_refused_without_blocking_and_sizes_are_bounded(tree, tmp_path):
    folder = tree / "root" / "fifo"
    folder.mkdir()
    shutil.copy(tree / "root" / "ok" / CONFIG, folder)
    os.mkfifo(folder / WEIGHTS)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(AdapterError, match="not a regular file"):
        copy_adapter_files("a", str(folder), str(dst), roots_of(tree), None)
    with pytest.raises(UploadTooLargeError, match="more than 50 bytes"):
        copy_adapter_files("a", str(tree / "root" / "ok"), str(dst), roots_of(tree), 50)
    copy_adapter_files("a", str(tree / "root" / "inner-link"), str(dst), roots_of(tree), 1000)
    assert (dst / WEIGHTS).read_bytes() == (tree / "root" / "ok" / WEIGHTS).read_bytes()


def test_weights_that_are_no_safetensors_are_refused_before_the_copy(tree, tmp_path):
    """A weights file whose header does not check (here 100 bytes of "w": a header length
    of about 8.6e18) is refused naming the user's file, and nothing of it is copied."""
    folder = tree / "root" / "not-safetensors"
    folder.mkdir()
    shutil.copy(tree / "root" / "ok" / CONFIG, folder)
    (folder / WEIGHTS).write_bytes(b"w" * 100)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(AdapterError, match="not a readable safetensors file") as err:
        copy_adapter_files("a", str(folder), str(dst), roots_of(tree), None)
    assert str(folder / WEIGHTS) in str(err.value)
    assert not (dst / WEIGHTS).exists()


# ---- the safetensors header ------------------------------------------------------------------

def write_safetensors(path, header: dict | bytes, data: bytes, header_len: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(2, 2), begin=0, end=16):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


HOSTILE = [
    ("huge header length", {}, b"", 1 << 40, "exceeds the limit"),
    ("header past the end", {}, b"", 1000, "past the end of the file"),
    ("not json", b"{nope", b"", None, "not valid JSON"),
    ("not an object", b"[1]", b"", None, "expected an object"),
    ("duplicate name", b'{"a": 1, "a": 2}', b"", None, "names 'a' twice"),
    ("integer dtype", {"a": entry(dtype="I32")}, b"\0" * 16, None, "is not allowed"),
    ("unknown field", {"a": {**entry(), "extra": 1}}, b"\0" * 16, None, "exactly"),
    ("negative dim", {"a": entry(shape=(-2, -2))}, b"\0" * 16, None, "non-negative"),
    ("shape not span", {"a": entry(shape=(2, 3))}, b"\0" * 16, None, "span 16"),
    ("offsets outside", {"a": entry(begin=8, end=24)}, b"\0" * 16, None, "outside the data"),
    ("overlap", {"a": entry(), "b": entry(begin=8, end=24, shape=(4,))}, b"\0" * 24, None,
     "overlap"),
    ("gap", {"a": entry(begin=4, end=20)}, b"\0" * 20, None, "belong to no tensor"),
    ("trailing bytes", {"a": entry()}, b"\0" * 20, None, "cover 16"),
    ("metadata not strings", {"__metadata__": {"x": 1}}, b"", None, "strings to strings"),
]


@pytest.mark.parametrize("case, header, data, header_len, words", HOSTILE,
                         ids=[h[0] for h in HOSTILE])
def test_hostile_safetensors_headers_are_refused_unread(tmp_path, case, header, data,
                                                        header_len, words):
    path = write_safetensors(tmp_path / "x.safetensors", header, data, header_len)
    with pytest.raises(SafetensorsHeaderError, match=words):
        check_safetensors(path)


def test_what_safetensors_writes_passes_the_check(tmp_path):
    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(2, dtype=torch.bfloat16),
               "c": torch.zeros(0, 4, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "ok.safetensors"), metadata={"format": "pt"})
    header = check_safetensors(str(tmp_path / "ok.safetensors"))
    assert {k: e.shape for k, e in header.tensors.items()} == {
        "a": (3, 5), "b": (2,), "c": (0, 4)}
    assert header.metadata == {"format": "pt"}
