"""Spec of the registry of replicas (adapter_store/replicas.py) against a real embedded
valkey: what a scheduler publishes is what a frontend reads, by deltas, and a replica that
stops heart-beating leaves within its TTL."""
from __future__ import annotations

import asyncio
import time

import pytest

from slora.adapter_store.embedded_redis import EmbeddedRedis
from slora.adapter_store.registry import connect
from slora.adapter_store.replicas import (
    INDEX_KEY, ReplicaLoad, ReplicaPublisher, ReplicaReader, gpu_key, replica_key,
)
from slora.scheduler.replica_report import HostCacheMirror


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def redis_url(valkey) -> str:
    import redis

    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    return valkey.url


def run(coro):
    return asyncio.run(coro)


def test_what_a_replica_publishes_a_reader_reads(redis_url):
    async def go():
        client = connect(redis_url)
        pub = ReplicaPublisher(client, "r1", "10.0.0.1:50062")
        load = ReplicaLoad(num_running=3, num_waiting=1, num_free_pages=500, num_pages=900,
                           max_num_seqs=32)
        await pub.publish(load, {"a", "b"}, {"a", "b", "c"})
        [state] = await ReplicaReader(client).read()
        await client.aclose()
        return state

    state = run(go())
    assert (state.replica_id, state.address) == ("r1", "10.0.0.1:50062")
    assert state.load == ReplicaLoad(3, 1, 500, 900, 32, True)
    assert state.gpu_adapters == {"a", "b"} and state.host_adapters == {"a", "b", "c"}
    assert state.num_requests == 4


def test_changes_travel_as_deltas_and_unchanged_sets_are_not_reread(redis_url):
    """Replacing one adapter of 100 writes 2 set changes, not 100; a reader re-reads a
    replica's sets only when its version moved (checked by changing Redis behind it)."""
    async def go():
        client = connect(redis_url)
        pub = ReplicaPublisher(client, "r1", "h:1")
        many = {f"ad{i}" for i in range(100)}
        await pub.publish(ReplicaLoad(), many, set())
        first = pub.num_set_changes
        await pub.publish(ReplicaLoad(num_running=1), (many - {"ad0"}) | {"new"}, set())
        delta = pub.num_set_changes - first
        reader = ReplicaReader(client)
        [state] = await reader.read()
        await client.sadd(gpu_key("r1"), "sneaked-in")  # no version bump
        [again] = await reader.read()
        await pub.publish(ReplicaLoad(num_running=1), (many - {"ad0", "ad1"}) | {"new"}, set())
        [moved] = await reader.read()
        await client.aclose()
        return first, delta, state, again, moved

    first, delta, state, again, moved = run(go())
    assert first == 100 and delta == 2
    assert "new" in state.gpu_adapters and "ad0" not in state.gpu_adapters
    assert "sneaked-in" not in again.gpu_adapters
    assert "ad1" not in moved.gpu_adapters and "sneaked-in" in moved.gpu_adapters


def test_a_replica_that_stops_heartbeating_leaves_within_its_ttl(redis_url):
    """TTL 0.5 s: the replica is listed, then (no more publishes) gone after 0.5 s; its id
    leaves the index at the next read. One that leaves cleanly is gone at once."""
    async def go():
        client = connect(redis_url)
        dying = ReplicaPublisher(client, "dying", "h:1", ttl_s=0.5)
        leaving = ReplicaPublisher(client, "leaving", "h:2")
        await dying.publish(ReplicaLoad(), {"a"}, set())
        await leaving.publish(ReplicaLoad(), set(), set())
        reader = ReplicaReader(client)
        listed = [r.replica_id for r in await reader.read()]
        await leaving.remove()
        published_at = time.monotonic()
        while await client.exists(replica_key("dying")):
            await asyncio.sleep(0.05)
        gone_after = time.monotonic() - published_at
        after = await reader.read()
        index = await client.smembers(INDEX_KEY)
        await client.aclose()
        return listed, gone_after, after, index

    listed, gone_after, after, index = run(go())
    assert listed == ["dying", "leaving"]
    assert gone_after <= 0.5 + 0.2
    assert after == [] and index == set()


def test_keys_lost_by_redis_are_written_whole_again(redis_url):
    """FLUSHALL between two publishes (a Redis that restarted empty): the next publish
    notices the hash was gone and writes both sets whole."""
    async def go():
        client = connect(redis_url)
        pub = ReplicaPublisher(client, "r1", "h:1")
        await pub.publish(ReplicaLoad(), {"a", "b"}, {"c"})
        await client.flushall()
        await pub.publish(ReplicaLoad(), {"a", "b", "d"}, {"c"})
        [state] = await ReplicaReader(client).read()
        await client.aclose()
        return state

    state = run(go())
    assert state.gpu_adapters == {"a", "b", "d"} and state.host_adapters == {"c"}


def test_publisher_refuses_an_empty_id_or_ttl():
    with pytest.raises(ValueError, match="needs an id and an address"):
        ReplicaPublisher(None, "", "h:1")
    with pytest.raises(ValueError, match="ttl_s must be > 0, got 0"):
        ReplicaPublisher(None, "r", "h:1", ttl_s=0)


def test_host_cache_mirror_is_an_lru_by_bytes():
    mirror = HostCacheMirror(capacity_bytes=100)
    mirror.touch("a", 40)
    mirror.touch("b", 40)
    mirror.touch("a", 40)  # a is now the most recent
    mirror.touch("c", 40)  # 120 > 100: b goes
    assert mirror.ids() == {"a", "c"} and mirror.num_bytes == 80
    mirror.touch("huge", 500)  # larger than the cache: not kept, evicts nothing
    assert mirror.ids() == {"a", "c"}


def test_two_fresh_readers_route_every_adapter_alike(redis_url):
    """A frontend keeps no routing state: two readers started from nothing (a restarted
    frontend and another one) read the same registry and rank the replicas the same way for
    each of 60 adapters, wherever the adapters are held."""
    from slora.frontend.routing import Router

    async def go():
        client = connect(redis_url)
        for i in range(4):
            pub = ReplicaPublisher(client, f"r{i}", f"h:{i}")
            await pub.publish(ReplicaLoad(num_running=i, num_free_pages=100, max_num_seqs=8),
                              {f"ad{j}" for j in range(i, 60, 4)}, {f"ad{j}" for j in range(30)})
        views = [await ReplicaReader(client).read() for _ in range(2)]
        await client.aclose()
        return views

    first, second = run(go())
    assert len(first) == 4
    orders = [[[r.replica_id for r in Router().rank(f"ad{j}", view, adapter_num_pages=1)]
               for j in range(60)] for view in (first, second)]
    assert orders[0] == orders[1]
    assert orders[0][5][0] == "r1"  # ad5 is on r1's GPU, and r1 has room
