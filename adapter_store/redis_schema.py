"""What the adapter registry keeps in Redis: key names, AdapterRecord, and the Lua scripts
that write them atomically (registry.py runs them).

Redis schema. Every key starts with `slora:`; no tensor or file byte is ever stored in Redis.
Adapters are keyed by their qualified id, `<owner>/<adapter_id>` (tenancy.py: ids are
namespaced per tenant; just `<adapter_id>` for the owner of auth-off registrations).

    slora:adapter:<qualified_id> hash, one per registered adapter; AdapterRecord's fields as
                                 strings (target_modules, module_ranks and shared_with as JSON,
                                 use_rslora and public "1" / "0", state "ready" | "deleting")
                                 plus request_id, the idempotency token of the call that wrote it
    slora:adapters               set of every registered qualified id
    slora:owner:<hex(owner)>     set of one owner's qualified ids (its count is the owner's
                                 quota); owners are free text, hence hex
    slora:public                 set of the qualified ids of public adapters
    slora:shared:<hex(tenant)>   set of the qualified ids shared with that tenant by name
    slora:blob:<sha256>          set of the qualified ids whose files are store_dir/<sha256>/
    slora:request:<hex(owner)>:<request_id>
                                 string, the adapter id a client's registration request made;
                                 expires after a day (REQUEST_TTL_S)

One store folder per Redis: the blob sets count references to that folder's content.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from slora.adapter_store.tenancy import check_sharing, qualified_id, visible_to

PREFIX = "slora:"
IDS_KEY = f"{PREFIX}adapters"
PUBLIC_KEY = f"{PREFIX}public"
REQUEST_TTL_S = 24 * 3600
"""How long a client's request_id is remembered for retries."""
DURABILITY_TIMEOUT_MS = 5000
"""How long WAITAOF may wait for the fsync before the write is answered UNAVAILABLE."""
STATE_READY = "ready"
STATE_DELETING = "deleting"
ADAPTER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
QUALIFIED_ID_RE = re.compile(r"(?:[A-Za-z0-9._-]{1,64}/)?[A-Za-z0-9._-]{1,128}")
"""An adapter id, or owner/adapter id (tenancy.qualified_id)."""
REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
"""A request id: 1 to 128 visible ASCII characters (a UUID fits)."""


def adapter_key(adapter_id: str) -> str:
    return f"{PREFIX}adapter:{adapter_id}"


def owner_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner.encode().hex()}"


def shared_key(tenant: str) -> str:
    return f"{PREFIX}shared:{tenant.encode().hex()}"


def blob_key(sha256: str) -> str:
    return f"{PREFIX}blob:{sha256}"


def request_key(owner: str, request_id: str) -> str:
    return f"{PREFIX}request:{owner.encode().hex()}:{request_id}"


@dataclass(frozen=True)
class Sharing:
    """Who besides its owner may use an adapter (tenancy.py)."""

    public: bool = False
    shared_with: tuple[str, ...] = ()

    def checked(self, owner: str) -> "Sharing":
        return Sharing(self.public, check_sharing(self.public, self.shared_with, owner))


PRIVATE = Sharing()


@dataclass(frozen=True)
class AdapterRecord:
    """A registered adapter as Redis holds it; the public Adapter message's fields and more."""

    adapter_id: str
    owner: str
    rank: int
    """Highest rank over its modules."""
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    """Targeted projections, in the model's lora_modules order."""
    module_ranks: dict[str, int]
    base_model: str
    """base_model_name_or_path of its adapter_config.json; "" when absent."""
    path: str
    """Its folder in the store: store_dir/<sha256>."""
    sha256: str
    size_bytes: int
    """Bytes of its two files."""
    created_unix: float
    num_pages: int
    """Pages of the unified pool it takes when resident."""
    state: str = STATE_READY
    """STATE_READY, or STATE_DELETING once a delete waits for the requests still using it."""
    public: bool = False
    """Every tenant may use it."""
    shared_with: tuple[str, ...] = ()
    """Tenants, besides the owner, that may use it (sorted)."""

    @property
    def qualified_id(self) -> str:
        """The id the servers know it by (tenancy.qualified_id)."""
        return qualified_id(self.owner, self.adapter_id)

    def visible_to(self, tenant: str) -> bool:
        return visible_to(self.owner, self.public, self.shared_with, tenant)

    def to_hash(self) -> dict[str, str]:
        d = asdict(self)
        d["use_rslora"] = "1" if self.use_rslora else "0"
        d["public"] = "1" if self.public else "0"
        d["target_modules"] = json.dumps(list(self.target_modules))
        d["module_ranks"] = json.dumps(self.module_ranks)
        d["shared_with"] = json.dumps(list(self.shared_with))
        return {k: str(v) for k, v in d.items()}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "AdapterRecord":
        return cls(
            adapter_id=h["adapter_id"], owner=h["owner"], rank=int(h["rank"]),
            lora_alpha=float(h["lora_alpha"]), use_rslora=h["use_rslora"] == "1",
            target_modules=tuple(json.loads(h["target_modules"])),
            module_ranks={m: int(r) for m, r in json.loads(h["module_ranks"]).items()},
            base_model=h["base_model"], path=h["path"], sha256=h["sha256"],
            size_bytes=int(h["size_bytes"]), created_unix=float(h["created_unix"]),
            num_pages=int(h["num_pages"]), state=h.get("state", STATE_READY),
            public=h.get("public") == "1",
            shared_with=tuple(json.loads(h.get("shared_with") or "[]")))


# KEYS: adapter hash, ids set, owner set, blob set, request key, public set, then the shared
# sets of the tenants it is shared with.
# ARGV: qualified id, sha256, owner, token, request TTL (0: no client request id), the owner's
# adapter quota (0: none), public "1" | "0", then the hash's field/value pairs.
REGISTER_LUA = """
local ttl = tonumber(ARGV[5])
local quota = tonumber(ARGV[6])
if ttl > 0 then
  local prev = redis.call('GET', KEYS[5])
  if prev and prev ~= ARGV[1] then return {'request_reused', prev} end
end
local cur = redis.call('HMGET', KEYS[1], 'sha256', 'owner', 'request_id', 'state')
if cur[1] then
  if cur[1] == ARGV[2] and cur[2] == ARGV[3] and cur[3] == ARGV[4] and cur[4] == 'ready' then
    -- A retry of the call that wrote this record. Rewriting a field makes this connection's
    -- WAITAOF cover the original write too: the append-only file is one ordered log.
    redis.call('HSET', KEYS[1], 'request_id', ARGV[4])
    return {'replayed', redis.call('HGETALL', KEYS[1])}
  end
  if cur[1] == ARGV[2] and cur[2] == ARGV[3] and cur[4] == 'ready' then
    -- The same content again under another request id (a re-run example): the registry
    -- answers with the stored record when the sharing asked for is the same too.
    return {'same', redis.call('HGETALL', KEYS[1])}
  end
  return {'taken', cur[1], cur[2], cur[4]}
end
if quota > 0 then
  local num = redis.call('SCARD', KEYS[3])
  if num >= quota then return {'quota', num} end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
if ARGV[7] == '1' then redis.call('SADD', KEYS[6], ARGV[1]) end
for i = 7, #KEYS do redis.call('SADD', KEYS[i], ARGV[1]) end
if ttl > 0 then redis.call('SET', KEYS[5], ARGV[1], 'EX', ttl) end
return {'created'}
"""

# KEYS: adapter hash, ids set, owner set, blob set, public set, then the shared sets named
# by the record as read. ARGV: qualified id, sha256, owner, request_id, shared_with as read.
# Returns the adapters left on the blob, -1 if gone, -2 if re-registered since it was read.
DELETE_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'sha256', 'owner', 'request_id', 'shared_with')
if not cur[1] then return -1 end
if cur[1] ~= ARGV[2] or cur[2] ~= ARGV[3] or cur[3] ~= ARGV[4] or
   (cur[4] or '[]') ~= ARGV[5] then return -2 end
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do
  if i ~= 4 then redis.call('SREM', KEYS[i], ARGV[1]) end
end
redis.call('SREM', KEYS[4], ARGV[1])
return redis.call('SCARD', KEYS[4])
"""

# KEYS: adapter hash. ARGV: new state. Returns the hash after the change, {} if absent.
SET_STATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""
