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
    "error, unavailable, step_failed, queue_full, early_abort_submit, early_abort_queue",
    ["outcome"])
WORKER_HUNG = Counter(
    "slora_worker_hung", "Times a step ran past its hung-step limit (the worker counted as "
    "lost)")

STATS_SPECS = [
    StatSpec("slora_queue_depth", "Requests waiting to be admitted", key="num_waiting"),
    StatSpec("slora_running_batch_size", "Requests in the running batch", key="num_running"),
    StatSpec("slora_pool_pages", "Pages of the unified pool by use", label="use",
             label_keys=(("free", "pages_free"), ("kv", "pages_kv"),
                         ("adapter", "pages_adapter"))),
    StatSpec("slora_pool_pages_total", "Pages of the unified pool", key="pages_total"),
    StatSpec("slora_adapter_loads", "Adapter loads into the unified pool", kind="counter",
             key="adapter_loads"),
    StatSpec("slora_adapter_evictions", "Adapter evictions from the unified pool",
             kind="counter", key="adapter_evictions"),
    StatSpec("slora_preemptions", "Running requests sent back to the queue for pages",
             kind="counter", key="preemptions"),
    StatSpec("slora_worker_available", "1 while the worker answers", key="worker_available"),
    StatSpec("slora_scheduler_paused", "1 while paused (Pause RPC)", key="paused"),
    StatSpec("slora_estimated_step_seconds", "Moving average of step time (0 until "
             "measured; early abort uses a fit on each step's tokens)", key="step_time_us",
             scale=1e-6),
]


def resident_adapters_spec(device: str) -> StatSpec:
    """Adapters in the unified pool, labelled with the worker's device ("cuda", "cuda:1",
    "cpu"): the pool is on the GPU only where the worker is."""
    return StatSpec("slora_adapters_resident", "Adapters resident in the unified pool, on "
                    "the worker's device", label="device",
                    label_keys=((device, "adapters_resident"),))


def register_driver_stats(read_stats, device: str) -> None:
    """Exports `read_stats()` (StepDriver.stats) at each scrape; `device`: the worker's."""
    register_stats(read_stats, [*STATS_SPECS, resident_adapters_spec(device)])
