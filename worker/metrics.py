"""The worker's Prometheus metrics (served by common/metrics.py's endpoint): its own step
time, and its host-memory adapter cache, read at each scrape."""
from __future__ import annotations

from prometheus_client import Histogram

from slora.common.metrics import TOKEN_BUCKETS_S, StatSpec, register_stats

STEP_TIME = Histogram(
    "slora_worker_step_time_seconds", "Time the worker spends executing one step command",
    buckets=TOKEN_BUCKETS_S)

STATS_SPECS = [
    StatSpec("slora_adapters_host_memory", "Adapters held in the host-memory cache",
             key="host_adapters"),
    StatSpec("slora_host_cache_bytes", "Bytes of adapter weights in the host-memory cache",
             key="host_bytes"),
    StatSpec("slora_host_cache_loads", "Adapters read from disk into the host-memory cache "
             "(cache misses)", kind="counter", key="host_misses"),
    StatSpec("slora_host_cache_hits", "Adapter look-ups answered by the host-memory cache",
             kind="counter", key="host_hits"),
    StatSpec("slora_host_cache_evictions", "Adapters dropped from the host-memory cache",
             kind="counter", key="host_evictions"),
    StatSpec("slora_worker_requests", "Requests whose state the worker holds",
             key="requests"),
]


def register_worker_stats(worker) -> None:
    """Exports the worker's host cache and request counts at each scrape (plain counters,
    safe to read while the step thread runs)."""
    def read() -> dict[str, float]:
        cache = worker.host_cache
        return {"host_adapters": len(cache), "host_bytes": cache.num_bytes,
                "host_misses": cache.misses, "host_hits": cache.hits,
                "host_evictions": cache.evictions, "requests": len(worker.requests)}

    register_stats(read, STATS_SPECS)
