"""The scheduler's Prometheus metrics (served by common/metrics.py's endpoint).

Gauges and counters of the pool, queue and adapter residency are read from the driver's
stats at each scrape; histograms and outcome counters are recorded as things happen.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from slora.common.metrics import (
    BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S, TOKEN_BUCKETS_S, StatSpec, register_stats,
)

STEP_TIME = Histogram(
    "slora_step_time_seconds", "Worker step time as the scheduler sees it (result received "
    "minus the later of command sent and previous result)", buckets=TOKEN_BUCKETS_S)
STEP_BATCH_SIZE = Histogram(
    "slora_step_batch_size", "Requests run by one step (prefill chunks and decodes)",
    buckets=BATCH_SIZE_BUCKETS)
QUEUE_WAIT = Histogram(
    "slora_queue_wait_seconds", "From submission to admission into the running batch",
    buckets=LATENCY_BUCKETS_S)
REQUESTS = Counter(
    "slora_scheduler_requests", "Requests by how they ended: stop, length, cancelled, "
    "error, unavailable, internal, queue_full, early_abort_submit, early_abort_queue",
    ["outcome"])

STATS_SPECS = [
    StatSpec("slora_queue_depth", "Requests waiting to be admitted", key="num_waiting"),
    StatSpec("slora_running_batch_size", "Requests in the running batch", key="num_running"),
    StatSpec("slora_pool_pages", "Pages of the unified pool by use", label="use",
             label_keys=(("free", "pages_free"), ("kv", "pages_kv"),
                         ("adapter", "pages_adapter"))),
    StatSpec("slora_pool_pages_total", "Pages of the unified pool", key="pages_total"),
    StatSpec("slora_adapters_resident_gpu", "Adapters resident in the GPU pool",
             key="adapters_resident"),
    StatSpec("slora_adapter_loads", "Adapter loads into the GPU pool", kind="counter",
             key="adapter_loads"),
    StatSpec("slora_adapter_evictions", "Adapter evictions from the GPU pool",
             kind="counter", key="adapter_evictions"),
    StatSpec("slora_preemptions", "Running requests sent back to the queue for pages",
             kind="counter", key="preemptions"),
    StatSpec("slora_worker_available", "1 while the worker answers", key="worker_available"),
    StatSpec("slora_scheduler_paused", "1 while paused (Pause RPC)", key="paused"),
    StatSpec("slora_estimated_step_seconds", "Moving average of step time used by early "
             "abort (0 until measured)", key="step_time_us", scale=1e-6),
]


def register_driver_stats(read_stats) -> None:
    """Exports `read_stats()` (StepDriver.stats) at each scrape."""
    register_stats(read_stats, STATS_SPECS)
