"""Adapter records that outlive a short Redis outage: the frontend's stale-if-error cache.

Every look-up goes to Redis first, so a delete or a change of who may use an adapter takes
effect at once. Only when Redis is unavailable (restarting, unreachable) is the last record
read for the same key served instead, if it is younger than MAX_AGE_S; and for RETRY_AFTER_S
after a failure, keys with such a record skip Redis (each try would cost redis-py's
reconnect attempts). So generation for adapters used in the last minutes goes on through a
Redis restart, while registration, listing and unknown adapters answer UNAVAILABLE until
Redis is back.

In memory only, bounded (MAX_ENTRIES, least recently used out): the frontend stays
stateless; a restarted frontend starts empty and simply needs Redis for its first look-ups.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Hashable

from slora.common.errors import AdapterNotFoundError, RegistryUnavailableError
from slora.frontend import metrics

log = logging.getLogger("slora.frontend")

MAX_ENTRIES = 10_000
MAX_AGE_S = 300.0
"""The oldest record served while Redis is unavailable."""
RETRY_AFTER_S = 1.0
"""After a failure, cached keys skip Redis this long."""


class StaleIfErrorCache:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_age_s: float = MAX_AGE_S):
        self.max_entries, self.max_age_s = max_entries, max_age_s
        self._entries: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        """key -> (when read from Redis, the record), least recently used first."""
        self._redis_down_until = 0.0

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[object]]):
        """fetch()'s record, or the cached one for `key` while Redis is unavailable. `key`
        must name everything the record depends on (the adapter id, and the tenant asking
        when visibility depends on it)."""
        now = time.monotonic()
        if now < self._redis_down_until:
            record = self._fresh(key, now)
            if record is not None:
                return record
        try:
            record = await fetch()
        except RegistryUnavailableError:
            self._redis_down_until = time.monotonic() + RETRY_AFTER_S
            record = self._fresh(key, now)
            if record is None:
                raise
            return record
        except AdapterNotFoundError:
            self._entries.pop(key, None)
            raise
        self._entries[key] = (now, record)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return record

    def _fresh(self, key: Hashable, now: float):
        entry = self._entries.get(key)
        if entry is None or now - entry[0] > self.max_age_s:
            return None
        metrics.ADAPTER_RECORDS_STALE.inc()
        return entry[1]
