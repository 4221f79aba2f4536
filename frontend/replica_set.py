"""The frontend's replicas: the registry's view read from Redis every REFRESH_S, one gRPC
channel per replica, and Submit with transparent retry.

What it holds is a cache of Redis (adapter_store/replicas.py) plus two short-lived hints: its
own streams open on each replica (a replica's load is the registry's figure plus the streams
this frontend opened there since the read, minus those it closed: a burst between two reads
spreads by the bounded load instead of landing on one replica, and a load read just before
its requests finished does not hold for REFRESH_S), and the replicas that just failed a call
(tried last for SUSPECT_S). A restarted frontend loses only those hints
and routes the same way from Redis alone.

Each replica's health is watched (grpc.health.v1 Watch, scheduler_watch.py): one whose
stream breaks (killed, its host gone) or says NOT_SERVING is skipped at once, before its TTL
drops it from Redis, and the frontend's own health is SERVING while any replica is usable.
Without registered replicas (a scheduler started without --redis-url), the frontend's
--scheduler-address is the one replica, available while its health Watch says SERVING.

Retry. A Submit that fails before its first event (the replica is gone, draining, its worker
down, or its queue full) is sent to the next replica of the routing order, up to MAX_TRIES;
the scheduler sends no event before the first token, so the client sees nothing of it. Once a
token has gone out the stream is not retried: it ends UNAVAILABLE (generation.py).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

import grpc
from redis.exceptions import RedisError

from slora.adapter_store.replicas import ReplicaLoad, ReplicaReader, ReplicaState
from slora.frontend import metrics
from slora.frontend.routing import Router
from slora.frontend.scheduler_watch import watch_scheduler
from slora.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("slora.frontend")

REFRESH_S = 0.25
"""How often the registry is read (a replica's load is at most this much older)."""
SUSPECT_S = 2.0
"""A replica that failed a call is tried last for this long."""
MAX_TRIES = 3
RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.CANCELLED)
"""Codes of a Submit that failed before its first event and is sent elsewhere (CANCELLED: a
scheduler stopping under us; the client going away cancels this task instead)."""
STATIC_REPLICA_ID = "static"


class NoReplicaError(Exception):
    pass


class ReplicaSet:
    def __init__(self, redis_client, router: Router, static_address: str | None = None,
                 channel_options=(), interceptors=()):
        self.reader = ReplicaReader(redis_client) if redis_client is not None else None
        self.router = router
        self.static_address = static_address
        self._options = list(channel_options)
        self._interceptors = list(interceptors)
        """Send the deployment's internal secret (common/internal_auth.py)."""
        self.registered: list[ReplicaState] = []
        self._in_flight: collections.Counter[str] = collections.Counter()
        """This frontend's streams open on each replica, now..."""
        self._in_flight_at_read: collections.Counter[str] = collections.Counter()
        """...and when the registry was last read."""
        self._suspect_until: dict[str, float] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._reachable: dict[str, bool] = {}
        """address -> what its health Watch said last (absent: not heard yet)."""
        self._on_serving = None
        self._serving: bool | None = None
        self._redis_ok = True

    # -- the view -------------------------------------------------------------------------

    def replicas(self) -> list[ReplicaState]:
        """The registered replicas (else the --scheduler-address one), each unavailable
        while its health Watch says it is down: a killed replica is skipped at once, not
        only when its TTL drops it from Redis."""
        if self.registered:
            return [r if self._reachable.get(r.address, True) or not r.load.available
                    else dataclasses.replace(r, load=dataclasses.replace(r.load, available=False))
                    for r in self.registered]
        if self.static_address:
            return [ReplicaState(STATIC_REPLICA_ID, self.static_address, ReplicaLoad(
                available=self._reachable.get(self.static_address, False)))]
        return []

    @property
    def serving(self) -> bool:
        return any(r.load.available for r in self.replicas())

    async def refresh(self) -> None:
        if self.reader is not None:
            try:
                replicas = await self.reader.read()
            except (RedisError, OSError) as e:
                if self._redis_ok:
                    log.warning("replica registry unreadable (%s); routing on the last view",
                                e)
                self._redis_ok = False
                return
            self._redis_ok = True
            before = {r.replica_id for r in self.registered}
            self.registered = replicas
            self._in_flight_at_read = collections.Counter(self._in_flight)
            if {r.replica_id for r in replicas} != before:
                log.info("replicas: %s", ", ".join(
                    f"{r.replica_id}@{r.address}" for r in replicas) or "none")
        self._watch({r.address for r in self.replicas()} |
                    ({self.static_address} if self.static_address else set()))
        await self._notify()

    def _watch(self, addresses: set[str]) -> None:
        """A health Watch on each address; channels and watches of others closed."""
        for address in addresses - set(self._watchers):
            async def on_health(serving: bool, address=address) -> None:
                self._reachable[address] = serving
                await self._notify()

            self._watchers[address] = asyncio.ensure_future(
                watch_scheduler(self._channel(address), on_health))
        for address in set(self._watchers) - addresses:
            self._watchers.pop(address).cancel()
            self._reachable.pop(address, None)
            channel = self._channels.pop(address, None)
            if channel is not None:
                asyncio.ensure_future(channel.close())

    async def _notify(self) -> None:
        usable = sum(r.load.available for r in self.replicas())
        metrics.REPLICAS_AVAILABLE.set(usable)
        metrics.SCHEDULER_AVAILABLE.set(int(usable > 0))
        if self._on_serving is not None and self.serving != self._serving:
            self._serving = self.serving
            await self._on_serving(self._serving)

    async def run(self, on_serving=None) -> None:
        """Reads the registry every REFRESH_S until cancelled; `await on_serving(bool)`
        whenever whether any replica is available changes (at once when a replica's health
        changes)."""
        self._on_serving = on_serving
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_S)

    def mark_reachable(self, address: str) -> None:
        """The replica at `address` just answered (until its health Watch says more)."""
        self._reachable[address] = True

    async def wait_for_replica(self, timeout_s: float) -> ReplicaState:
        """The first available replica (for the model's Info at start)."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.refresh()
            usable = [r for r in self.replicas() if r.load.available or not self.registered]
            if usable:
                return usable[0]
            if time.monotonic() > deadline:
                raise NoReplicaError(f"no replica registered in Redis within {timeout_s:g} s")
            await asyncio.sleep(REFRESH_S)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address, options=self._options, interceptors=self._interceptors)
        return channel

    def stub(self, address: str) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self._channel(address))

    def order(self, adapter_id: str, adapter_num_pages: int) -> list[ReplicaState]:
        """The routing order, replicas that just failed last."""
        # The registry's loads, corrected by what this frontend opened and closed since it
        # read them (its own streams are the part of a replica's load it knows now).
        extra = {r: self._in_flight[r] - self._in_flight_at_read[r]
                 for r in self._in_flight.keys() | self._in_flight_at_read.keys()}
        ranked = self.router.rank(adapter_id, self.replicas(),
                                  adapter_num_pages=adapter_num_pages, extra_load=extra)
        now = time.monotonic()
        fresh = [r for r in ranked if self._suspect_until.get(r.replica_id, 0) <= now]
        return fresh + [r for r in ranked if r not in fresh]

    def done(self, ticket) -> None:
        """A stream that `submit` opened ended."""
        self._in_flight[ticket] -= 1
        if self._in_flight[ticket] <= 0:
            del self._in_flight[ticket]

    def mark_failed(self, replica: ReplicaState) -> None:
        self._suspect_until[replica.replica_id] = time.monotonic() + SUSPECT_S

    # -- calls ----------------------------------------------------------------------------

    async def submit(self, submit: scheduler_pb2.SubmitRequest, time_remaining):
        """Sends the Submit to the best replica and waits for its first event, retrying
        elsewhere on failure. Returns (call, first event or None if the stream ended without
        one, the replica). `time_remaining()`: seconds left of the client's deadline, or None.
        Raises the last AioRpcError when every try failed, NoReplicaError with none."""
        order = self.order(submit.adapter.adapter_id, submit.adapter.num_pages)
        if not order:
            raise NoReplicaError("no scheduler replica is available")
        last_error = None
        for replica in order[:MAX_TRIES]:
            ticket = replica.replica_id
            self._in_flight[ticket] += 1
            call = self.stub(replica.address).Submit(submit, timeout=time_remaining())
            try:
                try:  # the call caches this iterator: the caller's `async for` goes on
                    return call, await call.__aiter__().__anext__(), ticket
                except StopAsyncIteration:
                    return call, None, ticket
            except grpc.aio.AioRpcError as e:
                call.cancel()
                self.done(ticket)
                if e.code() not in RETRIED_CODES:
                    raise
                last_error = e
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.mark_failed(replica)
                log.info("replica %s failed before the first token (%s: %s); trying the next",
                         replica.replica_id, e.code().name, e.details())
        raise last_error

    async def drop_adapter(self, adapter_id: str) -> None:
        """DropAdapter on every replica (a deleted adapter leaves every pool); raises the
        first AioRpcError."""
        request = scheduler_pb2.DropAdapterRequest(adapter_id=adapter_id)
        await asyncio.gather(*(self.stub(r.address).DropAdapter(request)
                               for r in self.replicas()))

    async def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.cancel()
        self._watchers.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
