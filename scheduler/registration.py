"""This scheduler's entry in the registry of replicas (adapter_store/replicas.py): a task
that publishes the replica's report (replica_report.py) whenever it changed, at most every
MIN_PUBLISH_INTERVAL_S, and at least every heartbeat, which also refreshes the TTL. A Redis
outage is logged once and retried each tick; serving goes on without it (frontends keep
their last view until the TTL drops this replica from it).

Owner: the scheduler process (server.py wires it); the planner is read on the event loop's
thread only, like everywhere in scheduler/. This and server.py are scheduler/'s only imports
of adapter_store/: the registry's Redis schema and client (neither imports torch).
"""
from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from slora.adapter_store.replicas import (
    DEFAULT_HEARTBEAT_S, MIN_PUBLISH_INTERVAL_S, ReplicaLoad, ReplicaPublisher,
)
from slora.scheduler.replica_report import ReplicaReport

log = logging.getLogger("slora.scheduler")


class Registration:
    def __init__(self, publisher: ReplicaPublisher, report: ReplicaReport, is_available,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S):
        self.publisher, self.report = publisher, report
        self.is_available = is_available
        """() -> bool: whether the worker answers (and the scheduler is not draining)."""
        self.heartbeat_s = heartbeat_s
        self._last = None
        self._last_at = 0.0
        self._redis_ok = True
        self.task: asyncio.Task | None = None
        """The running `run()`, once started."""

    async def publish_once(self, force: bool = False) -> bool:
        """Publishes if the report changed or a heartbeat is due; True if it wrote."""
        load, gpu, host = self.report.snapshot(self.is_available())
        state = (tuple(sorted(load.items())), frozenset(gpu), frozenset(host))
        now = time.monotonic()
        if not force and state == self._last and now - self._last_at < self.heartbeat_s:
            return False
        try:
            await self.publisher.publish(ReplicaLoad(**load), gpu, host)
        except (RedisError, OSError) as e:
            if self._redis_ok:
                log.warning("replica registry: cannot publish to Redis (%s); retrying", e)
            self._redis_ok = False
            self.publisher.resync()
            return False
        if not self._redis_ok:
            log.info("replica registry: publishing again")
        self._redis_ok = True
        self._last, self._last_at = state, now
        return True

    async def run(self) -> None:
        """Runs until cancelled."""
        while True:
            await self.publish_once()
            await asyncio.sleep(MIN_PUBLISH_INTERVAL_S)

    async def leave(self) -> None:
        try:
            await self.publisher.remove()
        except (RedisError, OSError) as e:
            log.warning("replica registry: could not remove this replica (%s); it expires "
                        "by its TTL", e)
