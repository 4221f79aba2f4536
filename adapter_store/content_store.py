"""The adapter store's files: validated PEFT folders named by the SHA-256 of their content.

Layout of `store_dir`:

    <sha256>/      adapter_config.json + adapter_model.safetensors of registered adapters;
                   sha256 is the hex SHA-256 of those two files' bytes in that order (what
                   `cat adapter_config.json adapter_model.safetensors | sha256sum` prints).
                   Adapters with the same bytes share one folder.
    .incoming/     copies being validated (one folder per registration in progress)
    .uploads/      uploads being written (UploadWriter)
    .locks/        256 lock files (by the sha256's first two hex digits); see `lock`

A folder reaches its content name only once it has been fully validated (every tensor read)
and fsynced: what is validated is the copy in the store, never the user's folder, which could
change after the check. The registry (registry.py) references folders from Redis; it holds
`lock(sha256)` while it places a folder and writes the metadata that references it, or drops
the metadata and removes an unreferenced folder, so the two never interleave across the
processes sharing the store. A registration cancelled mid-copy, or whose Redis write failed,
can leave a folder in .incoming or an unreferenced content folder: harmless, and reclaimable.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass

from slora.adapter_store.intake import AdapterRoots, copy_adapter_files
from slora.adapter_store.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterSpec,
    check_base_model,
    load_peft_adapter,
    read_adapter_config,
)
from slora.common.config import ModelConfig
from slora.common.errors import AdapterError

logger = logging.getLogger(__name__)

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
INCOMING_DIR, LOCKS_DIR = ".incoming", ".locks"
UPLOAD_SHOWN_AS = "upload"
"""What errors about an uploaded adapter name instead of the temporary folder."""


@dataclass
class StagedAdapter:
    """A validated copy in the store, not yet at its content name."""

    folder: str
    spec: AdapterSpec
    sha256: str
    file_sizes: tuple[int, ...]
    """Bytes of adapter_config.json, adapter_model.safetensors."""
    warning: str | None = None
    """What the user should know about an adapter accepted anyway (a base model name that
    is not the served model's), or None."""


def _file_sizes(folder: str) -> tuple[int, ...]:
    return tuple(os.path.getsize(os.path.join(folder, name)) for name in ADAPTER_FILES)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContentStore:
    """Stage (copy + validate + hash), place, lock and remove content folders. The staging
    methods block (file copies, reading every tensor): run them in a thread."""

    def __init__(self, store_dir: str, model: ModelConfig, base_model_name: str | None,
                 max_rank: int, strict_base_model: bool = False):
        self.store_dir = os.path.abspath(store_dir)
        self.model = model
        self.base_model_name = base_model_name
        self.max_rank = max_rank
        self.strict_base_model = strict_base_model
        for sub in (INCOMING_DIR, LOCKS_DIR):
            os.makedirs(os.path.join(self.store_dir, sub), exist_ok=True)

    def folder(self, sha256: str) -> str:
        return os.path.join(self.store_dir, sha256)

    def stage_path(self, adapter_id: str, path: str, roots: AdapterRoots | None = None,
                   max_bytes: int | None = None) -> StagedAdapter:
        """Copy the PEFT folder at `path` into the store and validate the copy. With `roots`,
        only a folder inside them is read (intake.py); nothing is parsed before the copy."""
        if roots is not None:
            roots.resolve_folder(path)  # refused before the store is touched
        folder = self._new_incoming()
        try:
            copy_adapter_files(adapter_id, path, folder, roots, max_bytes)
            return self._validate(adapter_id, folder, shown_as=path)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def stage_upload(self, adapter_id: str, tmp_dir: str) -> StagedAdapter:
        """Validate the folder an upload wrote; it is consumed (removed if refused)."""
        folder = tmp_dir
        try:
            if os.stat(tmp_dir).st_dev != os.stat(self.store_dir).st_dev:
                folder = self._new_incoming()  # another file system: copy so placing is a rename
                for name in os.listdir(tmp_dir):
                    shutil.copyfile(os.path.join(tmp_dir, name), os.path.join(folder, name))
                shutil.rmtree(tmp_dir, ignore_errors=True)
            extra = sorted(set(os.listdir(folder)) - set(ADAPTER_FILES))
            if extra:
                raise AdapterError(adapter_id, UPLOAD_SHOWN_AS,
                                   f"unexpected file {extra[0]!r}; an upload holds only "
                                   f"{CONFIG_FILE} and {WEIGHTS_FILE}")
            return self._validate(adapter_id, folder, shown_as=UPLOAD_SHOWN_AS)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise

    def _new_incoming(self) -> str:
        folder = os.path.join(self.store_dir, INCOMING_DIR, uuid.uuid4().hex)
        os.mkdir(folder)
        return folder

    def _validate(self, adapter_id: str, folder: str, shown_as: str) -> StagedAdapter:
        """The full PEFT check (every tensor read: shapes from another base model refuse
        it), the base model name check, the hash; fsyncs the files. Errors name `shown_as`
        (the user's path, or "upload"), not the copy."""
        try:
            spec = read_adapter_config(adapter_id, folder, self.model, self.max_rank)
            if self.strict_base_model:
                check_base_model(spec, self.base_model_name, strict=True)
            load_peft_adapter(adapter_id, folder, self.model, self.max_rank)
            warning = check_base_model(spec, self.base_model_name)
        except AdapterError as e:
            file = e.file.replace(folder, shown_as, 1) if e.file else e.file
            raise type(e)(e.adapter_id, file, e.reason) from None
        digest = hashlib.sha256()
        for name in ADAPTER_FILES:
            with open(os.path.join(folder, name), "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                os.fsync(f.fileno())
        if warning is not None:
            logger.warning(warning)
        return StagedAdapter(folder, spec, digest.hexdigest(), _file_sizes(folder), warning)

    def place(self, staged: StagedAdapter) -> bool:
        """Rename the staged copy to its content name, or drop it if that folder exists;
        True if this call created the folder. Call under `lock(staged.sha256)`."""
        target = self.folder(staged.sha256)
        try:
            if os.path.isdir(target):
                if _file_sizes(target) != staged.file_sizes:
                    raise AdapterError(staged.spec.adapter_id, target, "a stored adapter with "
                                       "the same sha256 has other file sizes")
                shutil.rmtree(staged.folder, ignore_errors=True)
                return False
            os.rename(staged.folder, target)
            _fsync_dir(self.store_dir)
            return True
        except BaseException:
            shutil.rmtree(staged.folder, ignore_errors=True)
            raise

    def remove(self, sha256: str) -> None:
        """Remove a content folder no adapter references. Call under `lock(sha256)`."""
        shutil.rmtree(self.folder(sha256), ignore_errors=True)

    @contextlib.asynccontextmanager
    async def lock(self, sha256: str):
        """Exclusive, across the processes sharing the store, for the content folders whose
        sha256 starts with the same two hex digits."""
        fd = os.open(os.path.join(self.store_dir, LOCKS_DIR, f"{sha256[:2]}.lock"),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            delay_s = 0.002
            while True:  # polled, not a blocking flock in a thread, so cancelling is clean
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(delay_s)
                    delay_s = min(2 * delay_s, 0.05)
            yield
        finally:
            os.close(fd)  # releases the lock
