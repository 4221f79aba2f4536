"""The registry of replicas in Redis: where each model replica listens, how loaded it is and
which adapters it holds on its GPU and in its host memory.

One replica is a scheduler and its worker group. Each scheduler writes its own keys
(ReplicaPublisher); every frontend reads all of them (ReplicaReader) and routes from them
(frontend/routing.py). Nothing else holds this state: a restarted frontend reads the same.

Redis schema (beside the adapter registry's, redis_schema.py):

    slora:replicas                   set of the ids of registered replicas (an index)
    slora:replica:<id>               hash: address, available ("1"/"0"), num_running,
                                     num_waiting, num_free_pages, num_pages, max_num_seqs,
                                     adapters_version (bumped whenever either set changes)
    slora:replica:<id>:gpu           set of the adapter ids resident in its GPU pool
    slora:replica:<id>:host          set of the adapter ids in its host-memory cache

The three keys of a replica expire `ttl_s` after its last heartbeat, so a replica that stops
(kill -9, a lost node) is gone from the registry within its TTL; readers drop its id from the
index when they find its hash gone. Traffic is bounded: a publish is one MULTI of the load
fields, the adapters that entered or left each set since the last publish (SADD/SREM deltas)
and the three EXPIREs; readers re-read a replica's sets only when its adapters_version moved.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from slora.adapter_store.redis_schema import PREFIX

log = logging.getLogger("slora.replicas")

INDEX_KEY = f"{PREFIX}replicas"
DEFAULT_TTL_S = 5.0
"""A replica that misses heartbeats this long leaves the registry."""
DEFAULT_HEARTBEAT_S = 1.0
"""A replica's keys are refreshed at least this often (and on every change, at most
MIN_PUBLISH_INTERVAL_S apart)."""
MIN_PUBLISH_INTERVAL_S = 0.1


def replica_key(replica_id: str) -> str:
    return f"{PREFIX}replica:{replica_id}"


def gpu_key(replica_id: str) -> str:
    return f"{replica_key(replica_id)}:gpu"


def host_key(replica_id: str) -> str:
    return f"{replica_key(replica_id)}:host"


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica's load, as its scheduler counts it."""

    num_running: int = 0
    """Requests in the running batch."""
    num_waiting: int = 0
    """Requests queued for admission."""
    num_free_pages: int = 0
    """Free pages of the unified pool."""
    num_pages: int = 0
    """All pages of the pool."""
    max_num_seqs: int = 0
    """Requests the replica runs at once."""
    available: bool = True
    """False while its worker is unreachable."""


@dataclass(frozen=True)
class ReplicaState:
    """One replica as the registry holds it: what routing decides on."""

    replica_id: str
    address: str
    load: ReplicaLoad = ReplicaLoad()
    gpu_adapters: frozenset[str] = frozenset()
    host_adapters: frozenset[str] = frozenset()

    @property
    def num_requests(self) -> int:
        return self.load.num_running + self.load.num_waiting


class ReplicaPublisher:
    """One scheduler's side: `publish` its load and adapter sets, `remove` on shutdown."""

    def __init__(self, client, replica_id: str, address: str, ttl_s: float = DEFAULT_TTL_S):
        if not replica_id or not address:
            raise ValueError(f"a replica needs an id and an address, got {replica_id!r}, "
                             f"{address!r}")
        if ttl_s <= 0:
            raise ValueError(f"replica ttl_s must be > 0, got {ttl_s}")
        self.client, self.replica_id, self.address = client, replica_id, address
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._published: dict[str, set[str]] = {"gpu": set(), "host": set()}
        self._version = 0
        self._full = True
        """Write whole sets next time (the first publish, or Redis lost our keys)."""
        self.num_publishes = 0
        self.num_set_changes = 0
        """Adapter ids added or removed over all publishes (the deltas' traffic)."""

    async def publish(self, load: ReplicaLoad, gpu_adapters, host_adapters) -> None:
        """Writes the load and the changes of both sets since the last publish, and
        refreshes the TTL. Raises redis-py's errors (the caller retries next heartbeat)."""
        wanted = {"gpu": set(gpu_adapters), "host": set(host_adapters)}
        keys = {"gpu": gpu_key(self.replica_id), "host": host_key(self.replica_id)}
        full = self._full
        changed = full or any(wanted[k] != self._published[k] for k in wanted)
        if changed:
            self._version += 1
        fields = {"address": self.address, "available": "1" if load.available else "0",
                  "adapters_version": str(self._version)}
        fields.update({f.name: str(getattr(load, f.name))
                       for f in dataclasses.fields(ReplicaLoad) if f.name != "available"})
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(replica_key(self.replica_id), mapping=fields)
        for kind, key in keys.items():
            if full:
                pipe.delete(key)
                added, removed = wanted[kind], set()
            else:
                added = wanted[kind] - self._published[kind]
                removed = self._published[kind] - wanted[kind]
            if added:
                pipe.sadd(key, *sorted(added))
            if removed:
                pipe.srem(key, *sorted(removed))
            self.num_set_changes += len(added) + len(removed)
        for key in (replica_key(self.replica_id), *keys.values()):
            pipe.pexpire(key, self.ttl_ms)
        pipe.sadd(INDEX_KEY, self.replica_id)
        results = await pipe.execute()
        self._published = wanted
        self._full = False
        self.num_publishes += 1
        # HSET answers how many fields it created: all of them when the hash was gone (Redis
        # restarted without it, or it expired), and then the deltas went to empty sets.
        if results[0] and not full:
            self._full = True
            await self.publish(load, gpu_adapters, host_adapters)

    def resync(self) -> None:
        """The next publish writes both sets whole (after a Redis error)."""
        self._full = True

    async def remove(self) -> None:
        """Leaves the registry now (a clean shutdown)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(replica_key(self.replica_id), gpu_key(self.replica_id),
                    host_key(self.replica_id))
        pipe.srem(INDEX_KEY, self.replica_id)
        await pipe.execute()


def _load_from_hash(fields: dict[str, str]) -> ReplicaLoad:
    values = {}
    for f in dataclasses.fields(ReplicaLoad):
        raw = fields.get(f.name)
        if f.name == "available":
            values[f.name] = raw != "0"
        else:
            try:
                values[f.name] = int(raw)
            except (TypeError, ValueError):
                values[f.name] = 0
    return ReplicaLoad(**values)


@dataclass
class ReplicaReader:
    """A frontend's reader of the registry. Keeps each replica's adapter sets with their
    version, so a refresh re-reads only the sets that changed: everything it knows can be
    read again from Redis (a restarted frontend starts empty and reads the same)."""

    client: object
    _sets: dict[str, tuple[str, frozenset[str], frozenset[str]]] = field(default_factory=dict)

    async def read(self) -> list[ReplicaState]:
        """Every registered replica, sorted by id."""
        ids = sorted(await self.client.smembers(INDEX_KEY))
        if not ids:
            self._sets.clear()
            return []
        pipe = self.client.pipeline(transaction=False)
        for replica_id in ids:
            pipe.hgetall(replica_key(replica_id))
        hashes = await pipe.execute()
        gone = [r for r, h in zip(ids, hashes) if not h]
        if gone:
            await self.client.srem(INDEX_KEY, *gone)
        live = [(r, h) for r, h in zip(ids, hashes) if h]
        stale = [r for r, h in live
                 if self._sets.get(r, ("",))[0] != h.get("adapters_version", "")]
        if stale:
            pipe = self.client.pipeline(transaction=False)
            for replica_id in stale:
                pipe.smembers(gpu_key(replica_id))
                pipe.smembers(host_key(replica_id))
            sets = await pipe.execute()
            hashes_by_id = dict(live)
            for i, replica_id in enumerate(stale):
                self._sets[replica_id] = (hashes_by_id[replica_id].get("adapters_version", ""),
                                          frozenset(sets[2 * i]), frozenset(sets[2 * i + 1]))
        for replica_id in set(self._sets) - {r for r, _ in live}:
            del self._sets[replica_id]
        return [ReplicaState(replica_id, h.get("address", ""), _load_from_hash(h),
                             self._sets[replica_id][1], self._sets[replica_id][2])
                for replica_id, h in live]
