"""Registration by path, safely: which folders a client may name, and copying from them.

A client's path is resolved on the server, so it must not reach what the client could not
read otherwise. The operator names adapter roots (`--adapter-roots`); a path is accepted only
if it is absolute and its real path (`..` and every symlink resolved) lies inside a root and
outside the adapter store (whose folders hold other tenants' adapters). A path that leaves the
roots is refused with PERMISSION_DENIED (PathNotAllowedError) before anything about it is
looked at, so the answer is the same whether or not it exists; INVALID_ARGUMENT is kept for
paths that are malformed (relative, NUL bytes) or for what is wrong inside an allowed folder.

Each file is opened, then checked: the real path of the opened descriptor
(/proc/self/fd/N on Linux) must lie inside a root, it must be a regular file (never a FIFO or a
device), and no larger than the limit. Checking what was opened, not the name before opening,
means a symlink swapped in between the check and the read cannot redirect it. Symlinks that
stay inside a root (a Hugging Face cache's snapshot links to its blobs) are followed. Nothing
is parsed from the user's folder: the files are copied into the store and only the copy is
validated (content_store.py), so a config that is a link to another tenant's adapter is
refused by path, not half-read. The one exception is cheap: the weights file's safetensors
header (at most 16 MiB) is checked before its copy starts, so a file that is not one (a
multi-gigabyte sparse file, say) is refused without copying it; the copy is checked again.

Hard links are not detected: the roots should hold only files every tenant may read.
"""
from __future__ import annotations

import os
import stat
from typing import Sequence

from slora.adapter_store.peft import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE
from slora.adapter_store.safetensors_check import SafetensorsHeaderError, check_safetensors_file
from slora.common.errors import (
    AdapterError, InvalidRequestError, PathNotAllowedError, UploadTooLargeError,
)

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
COPY_CHUNK_BYTES = 1 << 20
_PROC_FD = "/proc/self/fd"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class AdapterRoots:
    """The folders registration by path may read from. No roots: registration by path is
    refused (uploads still work)."""

    def __init__(self, roots: Sequence[str], store_dir: str | None = None):
        self.roots = tuple(os.path.realpath(os.path.expanduser(r)) for r in roots if r)
        self.excluded = (os.path.realpath(store_dir),) if store_dir else ()

    def allows(self, real_path: str) -> bool:
        return (any(_inside(real_path, r) for r in self.roots)
                and not any(_inside(real_path, e) for e in self.excluded))

    def _refuse(self, path: str) -> PathNotAllowedError:
        return PathNotAllowedError(
            f"adapter path {path!r} is outside the adapter roots this server reads from "
            f"({', '.join(self.roots)}); place the folder under one, or upload it")

    def resolve_folder(self, path: str) -> str:
        """The real path of the folder `path` names, if a client may register from it."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InvalidRequestError(f"adapter path {path!r} is not a valid path")
        if not os.path.isabs(path):
            raise InvalidRequestError(
                f"adapter path {path!r} is relative; give the absolute path the servers see")
        if not self.roots:
            raise PathNotAllowedError(
                "registration by path is off on this server (it has no --adapter-roots); "
                "upload the folder instead (`slora adapters add ID PATH --upload`)")
        real = os.path.realpath(path)
        if not self.allows(real):
            raise self._refuse(path)
        return real

    def check_opened(self, fd: int, path: str) -> None:
        """Refuse an opened file whose real path is outside the roots."""
        proc_link = os.path.join(_PROC_FD, str(fd))
        real = os.readlink(proc_link) if os.path.isdir(_PROC_FD) else os.path.realpath(path)
        if not self.allows(real):
            raise self._refuse(path)


def copy_adapter_files(adapter_id: str, folder: str, dst_folder: str,
                       roots: AdapterRoots | None, max_bytes: int | None) -> None:
    """Copy adapter_config.json and adapter_model.safetensors from `folder` (a path a client
    gave, or already resolved) into `dst_folder`. `roots` None: no containment check
    (in-process use); `max_bytes` None: no size limit. Raises AdapterError (naming the
    client's path), PathNotAllowedError or UploadTooLargeError."""
    shown = folder
    if roots is not None:
        folder = roots.resolve_folder(folder)
    if not os.path.exists(folder):
        raise AdapterError(adapter_id, shown, "adapter path does not exist")
    if not os.path.isdir(folder):
        raise AdapterError(adapter_id, shown, "adapter path is not a directory (expected a "
                           f"PEFT folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    num_bytes = 0
    for name in ADAPTER_FILES:
        src = os.path.join(folder, name)
        try:
            # O_NONBLOCK: opening a FIFO must not hang the server; it is refused below.
            fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            if name == WEIGHTS_FILE and os.path.lexists(os.path.join(folder, PICKLE_FILE)):
                raise AdapterError(adapter_id, os.path.join(shown, PICKLE_FILE),
                                   "pickle adapters are refused; convert to safetensors "
                                   f"({WEIGHTS_FILE})") from None
            raise AdapterError(adapter_id, os.path.join(shown, name),
                               f"{name} is missing") from None
        except OSError as e:
            raise AdapterError(adapter_id, os.path.join(shown, name),
                               f"cannot be opened ({e.strerror})") from None
        with os.fdopen(fd, "rb") as src_file:
            if roots is not None:
                roots.check_opened(fd, os.path.join(shown, name))
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AdapterError(adapter_id, os.path.join(shown, name),
                                   "is not a regular file")
            num_bytes += st.st_size
            if max_bytes is not None and num_bytes > max_bytes:
                raise UploadTooLargeError(
                    f"adapter {adapter_id!r}: its files have more than {max_bytes} bytes "
                    "(this server's limit for one adapter)")
            os.set_blocking(fd, True)
            if name == WEIGHTS_FILE:  # a file that is no safetensors costs no copy
                try:
                    check_safetensors_file(src_file)
                except SafetensorsHeaderError as e:
                    raise AdapterError(adapter_id, os.path.join(shown, name),
                                       f"not a readable safetensors file ({e})") from None
                src_file.seek(0)
            with open(os.path.join(dst_folder, name), "wb") as dst_file:
                copied = 0
                while chunk := src_file.read(COPY_CHUNK_BYTES):
                    copied += len(chunk)
                    if copied > st.st_size:  # the file grew while being copied
                        raise AdapterError(adapter_id, os.path.join(shown, name),
                                           "changed while being copied")
                    dst_file.write(chunk)
