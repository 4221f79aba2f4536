"""The safetensors header, checked before the safetensors library reads anything.

A safetensors file is `u64 little-endian N`, then N bytes of a JSON object, then the tensor
bytes (the data section). The object maps each tensor name to
`{"dtype": "F32", "shape": [r, d], "data_offsets": [begin, end]}`, offsets relative to the
data section; an optional `__metadata__` maps strings to strings.

We read the 8 bytes and the header (never more than MAX_HEADER_BYTES) ourselves, and refuse
the file unless: the header fits in the file; it is one JSON object without duplicate names;
every dtype is a floating-point one an adapter may use; every shape is a short list of
non-negative integers whose product times the dtype's size is exactly the tensor's byte span;
every span lies inside the data section; and the spans, sorted, tile the data section with no
overlap and no gap (as the format requires). Only then may safetensors open the file, so a
hostile file (a pickle renamed, a header claiming terabytes, offsets past the end, overlapping
tensors) never reaches its parser or our memory.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 << 20
"""Largest header accepted. A Llama-70B adapter on every projection (80 layers x 7 modules x
2 tensors) has a header of about 120 KB; safetensors itself allows 100 MB."""
MAX_NUM_TENSORS = 1 << 16
MAX_NUM_DIMS = 8
DTYPE_NUM_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
"""The dtypes an adapter's weights may have, and their element sizes in bytes."""
METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsHeaderError(ValueError):
    """The file is not a safetensors file we accept; the message says why."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Byte offset of the tensor in the data section."""
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    """Byte offset of the data section in the file: 8 + the header's length."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise SafetensorsHeaderError(f"header names {key!r} twice")
        out[key] = value
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, raw, data_len: int) -> TensorEntry:
    def refuse(reason: str):
        raise SafetensorsHeaderError(f"tensor {name!r}: {reason}")

    if not isinstance(raw, dict) or set(raw) != _ENTRY_FIELDS:
        refuse(f"expected an object with exactly {sorted(_ENTRY_FIELDS)}, found {raw!r:.200}")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPE_NUM_BYTES:
        refuse(f"dtype {dtype!r:.40} is not allowed; expected a floating-point dtype "
               f"({', '.join(DTYPE_NUM_BYTES)})")
    if not (isinstance(shape, list) and len(shape) <= MAX_NUM_DIMS
            and all(_is_int(d) and d >= 0 for d in shape)):
        refuse(f"shape {shape!r:.100} is not a list of at most {MAX_NUM_DIMS} non-negative "
               "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        refuse(f"data_offsets {offsets!r:.100} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        refuse(f"data_offsets [{begin}, {end}] are outside the data section of {data_len} bytes")
    num_elements = 1
    for d in shape:
        num_elements *= d
    if num_elements * DTYPE_NUM_BYTES[dtype] != end - begin:
        refuse(f"shape {shape} of {dtype} is {num_elements * DTYPE_NUM_BYTES[dtype]} bytes, but "
               f"data_offsets [{begin}, {end}] span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def check_safetensors(path: str) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at `path` (see the module
    docstring); reads no tensor byte. Raises SafetensorsHeaderError naming what is wrong."""
    with open(path, "rb") as f:
        return check_safetensors_file(f)


def check_safetensors_file(f) -> SafetensorsHeader:
    """`check_safetensors` of an open binary file, read from its start (intake checks the
    user's file this way before copying a byte of it)."""
    f.seek(0)
    file_size = os.fstat(f.fileno()).st_size
    if file_size < 8:
        raise SafetensorsHeaderError(
            f"the file has {file_size} bytes; a safetensors file starts with an 8-byte "
            "header length")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise SafetensorsHeaderError(
            f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes "
            "(not a safetensors file, or a hostile one)")
    if header_len > file_size - 8:
        raise SafetensorsHeaderError(
            f"header length {header_len} runs past the end of the file ({file_size} bytes)")
    raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsHeaderError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(
            f"header is a JSON {type(header).__name__}; expected an object")
    metadata = header.pop(METADATA_KEY, {})
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise SafetensorsHeaderError(f"{METADATA_KEY} must map strings to strings")
    if len(header) > MAX_NUM_TENSORS:
        raise SafetensorsHeaderError(
            f"header lists {len(header)} tensors; at most {MAX_NUM_TENSORS}")
    data_start = 8 + header_len
    data_len = file_size - data_start
    tensors = {name: _entry(name, entry, data_len) for name, entry in header.items()}
    position, previous = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < position:
            raise SafetensorsHeaderError(
                f"tensors {previous!r} and {t.name!r} overlap (bytes {t.begin} to {position})")
        if t.begin > position:
            raise SafetensorsHeaderError(
                f"bytes {position} to {t.begin} of the data section belong to no tensor")
        position, previous = t.end, t.name
    if position != data_len:
        raise SafetensorsHeaderError(
            f"the data section has {data_len} bytes but its tensors cover {position}")
    return SafetensorsHeader(tensors, metadata, data_start)
