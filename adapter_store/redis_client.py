"""The Redis client every slora process uses (adapter registry, keys, registry of replicas),
without the adapter store's heavier imports (torch): the scheduler needs only this."""
from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from slora.adapter_store.redis_schema import DURABILITY_TIMEOUT_MS
from slora.common.errors import ConfigError

MAX_CONNECTIONS = 512
"""Redis connections of one process. Every public call reads Redis (its API key), so a burst
of calls shares them; past this many at once a call waits up to POOL_TIMEOUT_S."""
POOL_TIMEOUT_S = 5.0


def read_password(path: str | None) -> str | None:
    """The Redis password in the file `path` (--redis-password-file), or None."""
    if path is None:
        return None
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError(f"--redis-password-file {path}: {e.strerror}") from None


def connect(url: str, *, password: str | None = None,
            socket_timeout_s: float = 10.0) -> aioredis.Redis:
    """A redis-py asyncio client for the registry: strings in and out, a few quick retries
    with backoff on a dropped connection (a Redis restart), then RegistryUnavailableError.
    Its pool blocks when all MAX_CONNECTIONS are in use (redis-py's default pool raises
    "Too many connections" past 100, which a burst of calls reaches). `password`: for a URL
    without one (a password in the URL wins)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, password=password, max_connections=MAX_CONNECTIONS, timeout=POOL_TIMEOUT_S,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=max(socket_timeout_s, DURABILITY_TIMEOUT_MS / 1000 + 1),
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError], health_check_interval=15)
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool, as from_url's does
    return client
