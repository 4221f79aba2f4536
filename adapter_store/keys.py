"""API keys: each belongs to one tenant; stored in Redis as salted scrypt hashes, never in
clear.

A key reads `slora_<key_id>_<secret>`: key_id is 16 hex digits, public, the Redis key it is
looked up by; secret is 32 random bytes (urlsafe base64). Redis holds, per key id, the tenant,
the admin flag, a random 16-byte salt and scrypt(secret, salt); a presented key is hashed the
same way and compared in constant time (hmac.compare_digest). The clear key exists only in the
answer to the call that created it (and in the admin key file `slora up` writes, mode 0600).

    slora:key:<key_id>     hash: key_id, tenant, admin "1" | "0", salt and hash (hex), kdf,
                           description, created_unix, revoked_unix ("0": active)
    slora:keys             set of every key id
    slora:admin_keys       set of the active admin keys' ids (the bootstrap checks it is empty)

scrypt is slow by design (about 0.1 s a hash on a busy 2-core box), too slow to pay on every
request: a frontend remembers, per
presented key (by its SHA-256, never the key itself), the stored hash it matched. Each call
still reads the key's Redis hash (one round trip), so a revocation applies to the very next
call on every frontend; only a key whose stored hash changed is hashed again. While Redis is
unreachable, a key this process verified within OUTAGE_GRACE_S keeps working (generation with
cached adapters goes on through a Redis restart); any other key gets UNAVAILABLE.

Writes wait for WAITAOF like registrations (registry.py), so a key that was handed out
survives a Redis crash.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from slora.adapter_store.registry import DURABILITY_TIMEOUT_MS, PREFIX, _redis_errors
from slora.adapter_store.tenancy import check_tenant
from slora.common.errors import (
    AuthenticationError, InvalidRequestError, KeyNotFoundError, LastAdminKeyError,
    RegistryUnavailableError,
)

logger = logging.getLogger(__name__)

KEY_PREFIX = "slora"
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
KEY_RE = re.compile(r"slora_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
ADMIN_TENANT = "admin"
"""The tenant of the admin key made at first start."""
SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES = 1 << 14, 8, 1, 32
SALT_BYTES = 16
"""scrypt's cost: 16 MiB and ~0.1 s per hash (the interactive-login setting)."""
KDF = f"scrypt-n{SCRYPT_N}-r{SCRYPT_R}-p{SCRYPT_P}"
MAX_DESCRIPTION_CHARS = 256
VERIFIED_CACHE_SIZE = 10_000
MAX_CONCURRENT_HASHES = 2
"""scrypt runs at most this many at once per process: wrong secrets sent for a known key id
cost the server a hash each, and this bounds what they can take (calls with a verified key
never hash)."""
OUTAGE_GRACE_S = 300.0
"""How long a verified key keeps working while Redis cannot be reached."""
NOT_REVOKED = "0"
KEYS_SET = f"{PREFIX}keys"
ADMIN_KEYS_SET = f"{PREFIX}admin_keys"
INVALID_KEY = "invalid API key"
NO_KEY_HASH_HEX = "00" * HASH_BYTES
"""What an unknown key id's secret is hashed against (no scrypt output is all zeros)."""


def key_hash_key(key_id: str) -> str:
    return f"{PREFIX}key:{key_id}"


def new_key() -> tuple[str, str]:
    """(key_id, full key) of a fresh random key."""
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key(key: str) -> tuple[str, str]:
    """(key_id, secret) of a well-formed key; AuthenticationError otherwise."""
    match = KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise AuthenticationError(INVALID_KEY)
    return match[1], match[2]


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          dklen=HASH_BYTES, maxmem=64 << 20)


@dataclass(frozen=True)
class ApiKey:
    """A key as anyone may see it: no secret, no hash."""

    key_id: str
    tenant: str
    admin: bool
    description: str
    created_unix: float
    revoked_unix: float
    """0.0 while active."""

    @property
    def active(self) -> bool:
        return self.revoked_unix == 0.0

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "ApiKey":
        return cls(h["key_id"], h["tenant"], h["admin"] == "1", h.get("description", ""),
                   float(h["created_unix"]), float(h.get("revoked_unix", NOT_REVOKED)))


# KEYS: key hash, keys set, admin keys set. ARGV: key id, "1" to create only when no admin key
# is active (the first-start bootstrap), then the hash's field/value pairs.
# Returns 1 if created, 0 if the id exists, -1 if an admin key already exists.
_CREATE_LUA = """
if ARGV[2] == '1' and redis.call('SCARD', KEYS[3]) > 0 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'admin') == '1' then redis.call('SADD', KEYS[3], ARGV[1]) end
return 1
"""

# KEYS: key hash, admin keys set. ARGV: key id, time. Returns the hash after, {} if absent,
# {'last_admin'} if it is the only active admin key.
_REVOKE_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'admin', 'revoked_unix')
if not cur[1] then return {} end
if cur[1] == '1' and cur[2] == '0' and redis.call('SCARD', KEYS[2]) <= 1 then
  return {'last_admin'}
end
if cur[2] == '0' then redis.call('HSET', KEYS[1], 'revoked_unix', ARGV[2]) end
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _decoded(h):
    """A hash from redis-py (a dict) or from a script (a flat list) as str -> str; a set as
    a set of str."""
    if isinstance(h, dict):
        return {_str(k): _str(v) for k, v in h.items()}
    if isinstance(h, set):
        return {_str(x) for x in h}
    flat = [_str(x) for x in h]
    return dict(zip(flat[0::2], flat[1::2]))


class KeyStore:
    """Create, verify, list and revoke API keys. One per process; all methods async."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self._create_script = redis.register_script(_CREATE_LUA)
        self._revoke_script = redis.register_script(_REVOKE_LUA)
        # sha256(presented key) -> (stored hash hex, ApiKey, monotonic time verified)
        self._verified: collections.OrderedDict[bytes, tuple[str, ApiKey, float]] = \
            collections.OrderedDict()
        # (sha256(presented key), stored hash hex) -> the scrypt comparison under way, so that
        # a burst of first calls with one key pays one hash, not one each
        self._hashing: dict[tuple[bytes, str], asyncio.Future] = {}
        self._hash_slots = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self._no_key_salt_hex = os.urandom(SALT_BYTES).hex()

    # ---- creation ------------------------------------------------------------------------

    async def create(self, tenant: str, *, admin: bool = False,
                     description: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant`: (its record, the clear key, to show once)."""
        key_id, key = new_key()
        record = await self._store(key, tenant, admin, description, only_first_admin=False)
        return record, key

    async def bootstrap_admin(self, key: str | None = None) -> tuple[ApiKey | None, str | None]:
        """At a frontend's start. With `key` (an operator's): make sure it is stored, as an
        admin key of ADMIN_TENANT; returns (its record, None). Without: if no admin key is
        active, make one; returns (record, the clear key, to show once), else (None, None).
        Atomic across frontends starting together."""
        if key is not None:
            key_id, secret = parse_key(key)
            with _redis_errors("reading the admin key"):
                h = _decoded(await self.redis.hgetall(key_hash_key(key_id)))
            if h:
                record = ApiKey.from_hash(h)
                digest = await asyncio.to_thread(_scrypt, secret, bytes.fromhex(h["salt"]))
                if not hmac.compare_digest(digest, bytes.fromhex(h["hash"])):
                    raise AuthenticationError(
                        f"the given admin key's id {key_id} is stored with another secret")
                return record, None
            return await self._store(key, ADMIN_TENANT, True, "admin key (given)",
                                     only_first_admin=False), None
        _, key = new_key()
        try:
            record = await self._store(key, ADMIN_TENANT, True, "admin key (first start)",
                                       only_first_admin=True)
        except _AdminExists:
            return None, None
        return record, key

    async def _store(self, key: str, tenant: str, admin: bool, description: str, *,
                     only_first_admin: bool) -> ApiKey:
        check_tenant(tenant)
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequestError(
                f"description has {len(description)} characters; at most "
                f"{MAX_DESCRIPTION_CHARS}")
        key_id, secret = parse_key(key)
        salt = os.urandom(SALT_BYTES)
        digest = await asyncio.to_thread(_scrypt, secret, salt)
        record = ApiKey(key_id, tenant, admin, description, time.time(), 0.0)
        fields = {"key_id": key_id, "tenant": tenant, "admin": "1" if admin else "0",
                  "salt": salt.hex(), "hash": digest.hex(), "kdf": KDF,
                  "description": description, "created_unix": repr(record.created_unix),
                  "revoked_unix": NOT_REVOKED}
        args = [key_id, "1" if only_first_admin else "0"]
        args += [x for kv in fields.items() for x in kv]
        with _redis_errors("storing an API key"):
            async with self.redis.client() as conn:
                created = int(await self._create_script(
                    keys=[key_hash_key(key_id), KEYS_SET, ADMIN_KEYS_SET], args=args,
                    client=conn))
                if created == -1:
                    raise _AdminExists()
                if created == 0:
                    raise InvalidRequestError(f"key id {key_id} exists; make a new key")
                await _wait_durable(conn)
        logger.info("created API key %s for tenant %r%s", key_id, tenant,
                    " (admin)" if admin else "")
        return record

    # ---- verification --------------------------------------------------------------------

    async def verify(self, key: str) -> ApiKey:
        """The active key `key` is; AuthenticationError if it is malformed, unknown, wrong or
        revoked; RegistryUnavailableError if Redis cannot say (and the key was not verified
        here within OUTAGE_GRACE_S)."""
        key_id, secret = parse_key(key)
        fingerprint = hashlib.sha256(key.encode()).digest()
        try:
            with _redis_errors("checking an API key"):
                h = _decoded(await self.redis.hgetall(key_hash_key(key_id)))
        except RegistryUnavailableError:
            cached = self._verified.get(fingerprint)
            if cached is not None and time.monotonic() - cached[2] < OUTAGE_GRACE_S:
                return cached[1]
            raise
        if not h:
            # The same scrypt as a wrong secret for a real key (against a hash nothing
            # matches), so the answer's time does not tell which key ids exist.
            await self._matches((fingerprint, NO_KEY_HASH_HEX), secret, self._no_key_salt_hex)
            raise AuthenticationError(INVALID_KEY)
        cached = self._verified.get(fingerprint)
        flight = (fingerprint, h["hash"])
        if cached is None or not hmac.compare_digest(cached[0], h["hash"]):
            if not await self._matches(flight, secret, h["salt"]):
                self._hashing.pop(flight, None)
                raise AuthenticationError(INVALID_KEY)
        record = ApiKey.from_hash(h)
        if not record.active:
            self._verified.pop(fingerprint, None)
            self._hashing.pop(flight, None)
            raise AuthenticationError(f"API key {key_id} was revoked")
        # Cached before the flight is dropped, so a call arriving now finds one or the other.
        self._verified[fingerprint] = (h["hash"], record, time.monotonic())
        self._verified.move_to_end(fingerprint)
        self._hashing.pop(flight, None)
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return record

    async def _matches(self, flight: tuple[bytes, str], secret: str, salt_hex: str) -> bool:
        """scrypt(secret, salt) == the stored hash (flight[1]), in constant time; one hash
        per flight (presented key, stored hash) however many calls ask at once. The caller
        drops the flight once it has cached the outcome."""
        future = self._hashing.get(flight)
        if future is None:
            async def compare() -> bool:
                async with self._hash_slots:
                    digest = await asyncio.to_thread(_scrypt, secret, bytes.fromhex(salt_hex))
                return hmac.compare_digest(digest, bytes.fromhex(flight[1]))
            future = self._hashing[flight] = asyncio.ensure_future(compare())

            def drop_unless_matched(done: asyncio.Future) -> None:
                # A wrong secret's flight goes at once, even if every caller went away; a
                # matching one stays until a caller has cached it (bounded by the valid keys).
                if done.cancelled() or done.exception() is not None or not done.result():
                    self._hashing.pop(flight, None)
            future.add_done_callback(drop_unless_matched)
        return await asyncio.shield(future)

    # ---- listing and revocation ------------------------------------------------------------

    async def list(self, tenant: str = "", *, include_revoked: bool = False) -> list[ApiKey]:
        """Every key (or one tenant's), oldest first."""
        with _redis_errors("listing API keys"):
            ids = sorted(_decoded(await self.redis.smembers(KEYS_SET)))
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hgetall(key_hash_key(key_id))
                hashes = await pipe.execute()
        records = [ApiKey.from_hash(_decoded(h)) for h in hashes if h]
        records = [r for r in records if (not tenant or r.tenant == tenant)
                   and (include_revoked or r.active)]
        return sorted(records, key=lambda r: (r.created_unix, r.key_id))

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent): every frontend refuses it from its next call."""
        if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
            raise KeyNotFoundError(f"API key {key_id!r} does not exist")
        with _redis_errors("revoking an API key"):
            async with self.redis.client() as conn:
                flat = await self._revoke_script(
                    keys=[key_hash_key(key_id), ADMIN_KEYS_SET],
                    args=[key_id, repr(time.time())], client=conn)
                if not flat:
                    raise KeyNotFoundError(f"API key {key_id!r} does not exist")
                if len(flat) == 1:
                    raise LastAdminKeyError(
                        f"API key {key_id} is the last active admin key; create another "
                        "admin key before revoking it")
                await _wait_durable(conn)
        logger.info("revoked API key %s", key_id)
        return ApiKey.from_hash(_decoded(flat))


class _AdminExists(Exception):
    pass


_warned_no_waitaof = False


async def _wait_durable(conn: aioredis.Redis) -> None:
    """WAITAOF on the connection that wrote (see registry.py for why)."""
    global _warned_no_waitaof
    try:
        num_local, _ = await conn.waitaof(1, 0, DURABILITY_TIMEOUT_MS)
    except ResponseError as e:
        text = str(e).lower()
        if "unknown command" in text or "appendonly" in text:
            if not _warned_no_waitaof:
                logger.warning("redis cannot confirm writes are on disk (%s); API keys are "
                               "stored without WAITAOF", e)
                _warned_no_waitaof = True
            return
        raise
    if int(num_local) < 1:
        raise RegistryUnavailableError(
            f"redis did not confirm the write reached its append-only file within "
            f"{DURABILITY_TIMEOUT_MS} ms; retry")
