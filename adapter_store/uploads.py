"""Chunked adapter uploads streamed to a temporary folder inside the adapter store.

The Adapters.Upload RPC sends a header, then chunks that each name one of the two files of a
PEFT folder and carry its next bytes. UploadWriter appends each chunk to its file as it
arrives (nothing is held in memory), refuses any other file name (pickles by name, with the
message every path of slora gives them), and bounds the total bytes (RESOURCE_EXHAUSTED past
the limit, at the chunk that crosses it). `finish()` hands back
the folder for `AdapterRegistry.register_dir_upload`, which validates it and moves it into
the store; the folder sits in the store's file system so that move is a rename.
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import BinaryIO

from slora.adapter_store.peft import CONFIG_FILE, WEIGHTS_FILE
from slora.common.errors import InvalidRequestError, UploadTooLargeError

UPLOADS_DIR = ".uploads"
"""Folder of the store holding uploads in progress, one sub-folder each."""
UPLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Names torch.save / pickle.dump files go by."""


class UploadWriter:
    """One upload: `write` chunks in any order, then `finish()` or `abort()`.

    Not thread-safe; one RPC owns it. Every refusal is an InvalidRequestError that says what
    was sent and what is allowed, and leaves the writer aborted (its folder removed).
    """

    def __init__(self, store_dir: str, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"upload: max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        parent = os.path.join(store_dir, UPLOADS_DIR)
        os.makedirs(parent, exist_ok=True)
        self.tmp_dir = os.path.join(parent, uuid.uuid4().hex)
        os.mkdir(self.tmp_dir)
        self._files: dict[str, BinaryIO] = {}
        self._done = False

    def write(self, file_name: str, data: bytes) -> None:
        """Append `data` to `file_name` (adapter_config.json or adapter_model.safetensors)."""
        if self._done:
            raise InvalidRequestError("upload: a chunk arrived after the upload ended")
        if file_name not in UPLOAD_FILES:
            self.abort()
            if file_name.lower().endswith(PICKLE_SUFFIXES):
                raise InvalidRequestError(
                    f"upload: {file_name!r} is a pickle file; pickle adapters are refused, "
                    f"send {WEIGHTS_FILE} instead")
            raise InvalidRequestError(
                f"upload: file {file_name!r} is not accepted; send {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}")
        if self.num_bytes + len(data) > self.max_bytes:
            self.abort()
            raise UploadTooLargeError(
                f"upload: more than {self.max_bytes} bytes (the limit of one upload) "
                f"arrived, at {file_name!r}")
        f = self._files.get(file_name)
        if f is None:
            f = self._files[file_name] = open(os.path.join(self.tmp_dir, file_name), "wb")
        f.write(data)
        self.num_bytes += len(data)

    def finish(self) -> str:
        """Close and fsync both files; returns the folder (the caller now owns it)."""
        if self._done:
            raise InvalidRequestError("upload: finish() after the upload ended")
        missing = [name for name in UPLOAD_FILES if name not in self._files]
        if missing:
            self.abort()
            raise InvalidRequestError(f"upload: no bytes of {' or '.join(missing)} arrived; "
                                      f"an upload sends both {CONFIG_FILE} and {WEIGHTS_FILE}")
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._done = True
        return self.tmp_dir

    def abort(self) -> None:
        """Drop the upload and its folder; safe to call more than once."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._done = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
