"""The adapter registry: metadata in Redis; the files in the content store (content_store.py).

Redis schema: redis_schema.py (keys by qualified id `owner/adapter_id`, hashes, sets, and the
Lua scripts below run). Who may see an adapter: tenancy.py.

Registration: the content store copies the files in (an upload is already there), validates
the copy (the whole PEFT check, every tensor read; in a thread), hashes it and renames it to
its content name, fsynced; then, under the store's lock for that sha256, one Lua script writes
the hash and the sets, or refuses an id that is taken. A script is one atomic transaction, like
MULTI/EXEC, and needs no WATCH retry loop for its check-then-write.

Idempotency: each registration carries a token, the client's request_id (recorded under
`slora:request:...` for a day) or a fresh one. The hash stores it, so a retry of a call whose
write landed (the client's retry, or redis-py's own reconnect-and-resend) returns the stored
record instead of registering twice or refusing the id as taken. Registering the same content
under the same id again, with the same sharing, whatever the request id (a re-run script or
`slora demo-adapters`), also returns the stored record; other content or other sharing under
a taken id is ALREADY_EXISTS, saying what differs and what to do.

Durability: after each write we send `WAITAOF 1 0 <timeout>` on the same connection, and
acknowledge only once the server says the append-only file holding that write is fsynced
(WAITAOF waits for the calling connection's own last write, hence the same connection). Why
not `appendfsync always`: it makes every write of every client pay an fsync, while here only
acknowledged registrations and deletes pay it, and concurrent ones share one fsync; the server
can stay on `appendfsync everysec`, and an operator's Redis (7.2 or later, appendonly yes)
gives the same promise without a config change. A server without WAITAOF, or with appendonly
off, answers an error: we log a warning once and acknowledge without it (durability is then
that server's setting). Redis unreachable, loading, or not confirming within the timeout:
RegistryUnavailableError (UNAVAILABLE), and a retry with the same request_id is safe.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from slora.adapter_store.content_store import ContentStore, StagedAdapter
from slora.adapter_store.intake import AdapterRoots
from slora.adapter_store.redis_client import (  # noqa: F401 (re-exported for callers)
    MAX_CONNECTIONS, POOL_TIMEOUT_S, connect, read_password,
)
from slora.adapter_store.redis_schema import (  # noqa: F401 (re-exported for callers)
    ADAPTER_ID_RE, DELETE_LUA, REGISTER_LUA, SET_STATE_LUA, DURABILITY_TIMEOUT_MS, IDS_KEY,
    PREFIX, PRIVATE, PUBLIC_KEY, QUALIFIED_ID_RE, REQUEST_ID_RE, REQUEST_TTL_S, STATE_DELETING,
    STATE_READY, AdapterRecord, Sharing, adapter_key, blob_key, owner_key, request_key,
    shared_key,
)
from slora.adapter_store.tenancy import NO_TENANT, TENANT_RE, qualified_id, split_ref
from slora.common.config import ModelConfig
from slora.common.errors import (
    AdapterDeletingError,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidRequestError,
    QuotaExceededError,
    RegistryUnavailableError,
)

logger = logging.getLogger(__name__)

_UNAVAILABLE_REPLIES = ("LOADING", "MISCONF", "READONLY", "MASTERDOWN", "TRYAGAIN")


MAX_PAGE_TOKEN_CHARS = 200
"""A page token is a qualified id (at most 64 + 1 + 128 characters)."""




def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _as_dict(flat) -> dict[str, str]:
    """A hash from HGETALL inside a script: a flat [field, value, ...] list."""
    flat = [_str(x) for x in flat]
    return dict(zip(flat[0::2], flat[1::2]))


def _decoded(h: dict) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in h.items()}


def _check_adapter_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
        raise InvalidRequestError(
            f"adapter id {adapter_id!r} is invalid: use 1 to 128 characters of A-Z a-z 0-9 . _ -")


def _check_request_id(request_id: str) -> None:
    if request_id and not REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidRequestError(
            f"request id {request_id!r} is invalid: use 1 to 128 visible ASCII characters, "
            "or leave it empty")


@contextlib.contextmanager
def _redis_errors(what: str):
    """Redis down, restarting or refusing writes -> RegistryUnavailableError."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError) as e:
        raise RegistryUnavailableError(
            f"adapter registry unavailable during {what} ({type(e).__name__}: {e}); "
            "retry later") from e
    except ResponseError as e:
        if str(e).startswith(_UNAVAILABLE_REPLIES):
            raise RegistryUnavailableError(
                f"adapter registry unavailable during {what} ({e}); retry later") from e
        raise


class AdapterRegistry:
    """Register, look up, list and delete adapters. One per process; all methods async.

    `redis` is a redis.asyncio client (see `connect`); `store_dir` the folder owned by the
    store (a shared volume when frontends run on several hosts); `model` and `max_rank` what
    every adapter is validated against; `base_model_name` the served model's name: an adapter
    that names another is accepted with a warning when its shapes fit, refused with
    `strict_base_model` (None: no check).
    """

    def __init__(self, redis: aioredis.Redis, store_dir: str, model: ModelConfig,
                 base_model_name: str | None, max_rank: int, strict_base_model: bool = False):
        self.redis = redis
        self.store = ContentStore(store_dir, model, base_model_name, max_rank,
                                  strict_base_model)
        self.base_model_name = base_model_name
        self.model = model
        self._register_script = redis.register_script(REGISTER_LUA)
        self._delete_script = redis.register_script(DELETE_LUA)
        self._set_state_script = redis.register_script(SET_STATE_LUA)
        self._warned_no_waitaof = False

    # ---- registration --------------------------------------------------------------------

    async def register_path(self, adapter_id: str, path: str, *, owner: str = NO_TENANT,
                            request_id: str = "", sharing: Sharing = PRIVATE,
                            roots: AdapterRoots | None = None, max_bytes: int | None = None,
                            max_adapters: int = 0) -> AdapterRecord:
        """Register the PEFT folder at `path` (read here; copied into the store) as `owner`'s.
        `roots`: the folders a client may name (None: any, for in-process use); `max_bytes`:
        the largest adapter; `max_adapters`: the owner's quota (0: none)."""
        _check_adapter_id(adapter_id)
        _check_request_id(request_id)
        sharing = sharing.checked(owner)
        staged = await asyncio.to_thread(self.store.stage_path, adapter_id, path, roots,
                                         max_bytes)
        return await self._commit(staged, owner, request_id, sharing, max_adapters)

    async def register_dir_upload(self, adapter_id: str, tmp_dir: str, *,
                                  owner: str = NO_TENANT, request_id: str = "",
                                  sharing: Sharing = PRIVATE,
                                  max_adapters: int = 0) -> AdapterRecord:
        """Register the folder an upload wrote (UploadWriter.finish()); the folder is moved
        into the store, or removed when refused: the caller no longer owns it."""
        try:
            _check_adapter_id(adapter_id)
            _check_request_id(request_id)
            sharing = sharing.checked(owner)
        except InvalidRequestError:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        staged = await asyncio.to_thread(self.store.stage_upload, adapter_id, tmp_dir)
        return await self._commit(staged, owner, request_id, sharing, max_adapters)

    def _record(self, staged: StagedAdapter, owner: str, sharing: Sharing) -> AdapterRecord:
        spec = staged.spec
        return AdapterRecord(
            adapter_id=spec.adapter_id, owner=owner, rank=spec.rank, lora_alpha=spec.lora_alpha,
            use_rslora=spec.use_rslora,
            target_modules=tuple(m for m in self.model.lora_modules if m in spec.module_ranks),
            module_ranks=dict(spec.module_ranks), base_model=spec.base_model_name or "",
            path=self.store.folder(staged.sha256), sha256=staged.sha256,
            size_bytes=sum(staged.file_sizes), created_unix=time.time(),
            num_pages=spec.num_pages(self.model), public=sharing.public,
            shared_with=sharing.shared_with)

    async def _commit(self, staged: StagedAdapter, owner: str, request_id: str,
                      sharing: Sharing, max_adapters: int) -> AdapterRecord:
        """Place the files and write the metadata, under the store's lock for the content."""
        record = self._record(staged, owner, sharing)
        token = request_id or f"srv-{uuid.uuid4().hex}"
        keys = [adapter_key(record.qualified_id), IDS_KEY, owner_key(owner),
                blob_key(record.sha256), request_key(owner, request_id), PUBLIC_KEY]
        keys += [shared_key(t) for t in record.shared_with]
        fields = dict(record.to_hash(), state=STATE_READY, request_id=token)
        args = [record.qualified_id, record.sha256, owner, token,
                REQUEST_TTL_S if request_id else 0, max_adapters,
                "1" if record.public else "0"]
        args += [x for kv in fields.items() for x in kv]
        async with self.store.lock(record.sha256):
            created_folder = await asyncio.to_thread(self.store.place, staged)
            with _redis_errors(f"registration of adapter {record.adapter_id!r}"):
                async with self.redis.client() as conn:
                    reply = await self._register_script(keys=keys, args=args, client=conn)
                    outcome = _str(reply[0])
                    if outcome in ("created", "replayed", "same"):
                        await self._wait_durable(conn)
                if outcome not in ("created", "replayed", "same") and created_folder and \
                        await self.redis.scard(blob_key(record.sha256)) == 0:
                    await asyncio.to_thread(self.store.remove, record.sha256)
        if outcome == "created":
            logger.info("registered adapter %r (sha256 %s, %d bytes, owner %r, request %r)",
                        record.adapter_id, record.sha256, record.size_bytes, owner, request_id)
            return record
        if outcome == "replayed":
            return AdapterRecord.from_hash(_as_dict(reply[1]))
        if outcome == "same":
            stored = AdapterRecord.from_hash(_as_dict(reply[1]))
            if (stored.public, stored.shared_with) == (record.public, record.shared_with):
                return stored
            raise AdapterExistsError(record.adapter_id, None, (
                f"is already registered with the same content but shared otherwise (public="
                f"{stored.public}, shared_with={list(stored.shared_with)}; this call asks "
                f"public={record.public}, shared_with={list(record.shared_with)}); delete it "
                "first to change who may use it"))
        if outcome == "quota":
            who = f"tenant {owner!r}" if owner else "this server"
            raise QuotaExceededError(
                f"{who} has {_str(reply[1])} adapters registered; the limit is {max_adapters}"
                "; delete one first")
        if outcome == "request_reused":
            raise InvalidRequestError(
                f"request id {request_id!r} already registered adapter "
                f"{split_ref(_str(reply[1]), owner)[1]!r}; "
                f"use a new request id to register {record.adapter_id!r}")
        sha, taken_by, state = (_str(x) for x in reply[1:4])
        if state == STATE_DELETING:
            reason = "is being deleted; register it again once the delete has finished"
        elif sha != record.sha256:
            reason = (f"is already registered with other content (sha256 {sha[:12]}..., this "
                      f"one {record.sha256[:12]}...); delete it first or choose another id")
        else:
            reason = f"is already registered by tenant {taken_by!r}"
        raise AdapterExistsError(record.adapter_id, None, reason)

    async def _wait_durable(self, conn: aioredis.Redis) -> None:
        """WAITAOF on the connection that wrote: returns once the write is in an fsynced AOF."""
        try:
            num_local, _ = await conn.waitaof(1, 0, DURABILITY_TIMEOUT_MS)
        except ResponseError as e:
            text = str(e).lower()
            if "unknown command" in text or "appendonly" in text:
                if not self._warned_no_waitaof:
                    logger.warning("redis cannot confirm writes are on disk (%s); registrations "
                                   "are acknowledged without WAITAOF, durable only as far as the "
                                   "server's own persistence settings make them", e)
                    self._warned_no_waitaof = True
                return
            raise
        if int(num_local) < 1:
            raise RegistryUnavailableError(
                f"redis did not confirm the write reached its append-only file within "
                f"{DURABILITY_TIMEOUT_MS} ms; retry with the same request id")

    # ---- look-ups ------------------------------------------------------------------------

    async def get(self, adapter_id: str, *, include_deleting: bool = False) -> AdapterRecord:
        """The record of a qualified id (`owner/id`, or `id` for NO_TENANT);
        AdapterNotFoundError if absent, AdapterDeletingError (also NOT_FOUND) while a delete
        waits, unless include_deleting. No visibility check: see `lookup`."""
        if not isinstance(adapter_id, str) or not QUALIFIED_ID_RE.fullmatch(adapter_id):
            raise AdapterNotFoundError(adapter_id)
        with _redis_errors(f"look-up of adapter {adapter_id!r}"):
            h = await self.redis.hgetall(adapter_key(adapter_id))
        if not h:
            raise AdapterNotFoundError(adapter_id)
        record = AdapterRecord.from_hash(_decoded(h))
        if record.state == STATE_DELETING and not include_deleting:
            raise AdapterDeletingError(adapter_id)
        return record

    async def lookup(self, ref: str, tenant: str, *,
                     include_deleting: bool = False) -> AdapterRecord:
        """The adapter a client of `tenant` names by `ref` (`id`: its own; `owner/id`:
        another's), if that tenant may see it. A reference to an adapter it may not see is
        answered exactly as one to an adapter that does not exist (tenancy.py)."""
        owner, adapter_id = split_ref(ref, tenant) if isinstance(ref, str) else ("", "")
        if not ADAPTER_ID_RE.fullmatch(adapter_id) or (
                owner != NO_TENANT and not TENANT_RE.fullmatch(owner)):
            raise AdapterNotFoundError(ref)
        try:
            record = await self.get(qualified_id(owner, adapter_id), include_deleting=True)
        except AdapterNotFoundError:
            raise AdapterNotFoundError(ref) from None
        if not record.visible_to(tenant):
            raise AdapterNotFoundError(ref)
        if record.state == STATE_DELETING and not include_deleting:
            raise AdapterDeletingError(ref)
        return record

    async def list_visible(self, tenant: str) -> list[AdapterRecord]:
        """The adapters `tenant` may use: its own, public ones and those shared with it,
        sorted by qualified id."""
        records = await self._records(await self._visible_ids(tenant))
        return [r for r in records if r.visible_to(tenant) and r.state != STATE_DELETING]

    async def list_visible_page(self, tenant: str, page_size: int, after: str = ""
                                ) -> tuple[list[AdapterRecord], str]:
        """One page of `list_visible`: up to `page_size` records whose qualified ids sort
        after `after`, and the cursor of the next page ("" after the last). Reads only the
        hashes of that page (and of adapters it skips as hidden or being deleted)."""
        if page_size <= 0:
            raise InvalidRequestError(f"page_size must be positive, got {page_size}")
        if len(after) > MAX_PAGE_TOKEN_CHARS or (after and not QUALIFIED_ID_RE.fullmatch(after)):
            raise InvalidRequestError(
                f"page_token {after[:64]!r}{'...' if len(after) > 64 else ''} is not one this "
                "server gave: pass next_page_token of the previous page, or nothing")
        ids = [i for i in await self._visible_ids(tenant) if i > after]
        page: list[AdapterRecord] = []
        start = 0
        while len(page) < page_size and start < len(ids):
            chunk = ids[start:start + page_size - len(page)]
            start += len(chunk)
            page += [r for r in await self._records(chunk)
                     if r.visible_to(tenant) and r.state != STATE_DELETING]
        more = start < len(ids)
        return page, (page[-1].qualified_id if more and page else "")

    async def _visible_ids(self, tenant: str) -> list[str]:
        with _redis_errors("listing adapters"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in (owner_key(tenant), PUBLIC_KEY, shared_key(tenant)):
                    pipe.smembers(key)
                sets = await pipe.execute()
        return sorted(set().union(*({_str(i) for i in ids} for ids in sets)))

    async def list(self, owner: str | None = None, *,
                   include_deleting: bool = False) -> list[AdapterRecord]:
        """Every adapter (or one owner's), sorted by qualified id. No visibility check."""
        with _redis_errors("listing adapters"):
            ids = await self.redis.smembers(IDS_KEY if owner is None else owner_key(owner))
        records = await self._records(sorted(_str(i) for i in ids))
        return [r for r in records if include_deleting or r.state != STATE_DELETING]

    async def _records(self, ids: list[str]) -> list[AdapterRecord]:
        with _redis_errors("listing adapters"):
            records = []
            for start in range(0, len(ids), 512):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for adapter_id in ids[start:start + 512]:
                        pipe.hgetall(adapter_key(adapter_id))
                    hashes = await pipe.execute()
                records += [AdapterRecord.from_hash(_decoded(h)) for h in hashes if h]
        return records

    # ---- deletion ------------------------------------------------------------------------

    async def mark_deleting(self, adapter_id: str) -> AdapterRecord:
        """Refuse new requests for the adapter (get() answers AdapterDeletingError) while the
        delete waits for the running ones. Idempotent. The frontend's Delete: mark_deleting,
        the scheduler's DropAdapter, then delete (or cancel_delete if that fails)."""
        return await self._set_state(adapter_id, STATE_DELETING)

    async def cancel_delete(self, adapter_id: str) -> AdapterRecord:
        """Undo mark_deleting: the adapter serves again."""
        return await self._set_state(adapter_id, STATE_READY)

    async def _set_state(self, adapter_id: str, state: str) -> AdapterRecord:
        if not QUALIFIED_ID_RE.fullmatch(adapter_id):
            raise AdapterNotFoundError(adapter_id)
        with _redis_errors(f"marking adapter {adapter_id!r} {state}"):
            async with self.redis.client() as conn:
                flat = await self._set_state_script(keys=[adapter_key(adapter_id)],
                                                    args=[state], client=conn)
                if not flat:
                    raise AdapterNotFoundError(adapter_id)
                await self._wait_durable(conn)
        return AdapterRecord.from_hash(_as_dict(flat))

    async def delete(self, adapter_id: str) -> AdapterRecord:
        """Remove the adapter's metadata, then its files if no other adapter shares them.
        Does not wait for requests: the caller drains them first (see mark_deleting)."""
        if not isinstance(adapter_id, str) or not QUALIFIED_ID_RE.fullmatch(adapter_id):
            raise AdapterNotFoundError(adapter_id)
        for _ in range(3):
            with _redis_errors(f"look-up of adapter {adapter_id!r}"):
                h = _decoded(await self.redis.hgetall(adapter_key(adapter_id)))
            if not h:
                raise AdapterNotFoundError(adapter_id)
            record = AdapterRecord.from_hash(h)
            shared_as_read = h.get("shared_with") or "[]"
            keys = [adapter_key(adapter_id), IDS_KEY, owner_key(record.owner),
                    blob_key(record.sha256), PUBLIC_KEY]
            keys += [shared_key(t) for t in json.loads(shared_as_read)]
            args = [adapter_id, record.sha256, record.owner, h.get("request_id", ""),
                    shared_as_read]
            async with self.store.lock(record.sha256):
                with _redis_errors(f"deletion of adapter {adapter_id!r}"):
                    async with self.redis.client() as conn:
                        num_left = int(await self._delete_script(keys=keys, args=args,
                                                                 client=conn))
                        if num_left == -2:
                            continue  # re-registered since we read it: read it again
                        if num_left == -1:
                            raise AdapterNotFoundError(adapter_id)
                        await self._wait_durable(conn)
                if num_left == 0:
                    await asyncio.to_thread(self.store.remove, record.sha256)
            logger.info("deleted adapter %r (sha256 %s)", adapter_id, record.sha256)
            return record
        raise RegistryUnavailableError(
            f"adapter {adapter_id!r} kept changing while being deleted; retry")
