"""The frontend's Prometheus metrics (served by common/metrics.py's endpoint): every public
call by method and status code, and the latencies a user sees. No adapter label."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from slora.common.metrics import LATENCY_BUCKETS_S, TOKEN_BUCKETS_S

REQUESTS = Counter("slora_requests", "Public calls by method and gRPC status code",
                   ["method", "code"])
REQUEST_DURATION = Histogram("slora_request_duration_seconds",
                             "Public calls from arrival to their last message", ["method"],
                             buckets=LATENCY_BUCKETS_S)
TIME_TO_FIRST_TOKEN = Histogram(
    "slora_time_to_first_token_seconds",
    "Generation: from arrival at the frontend to the first output token",
    buckets=LATENCY_BUCKETS_S)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "slora_time_per_output_token_seconds",
    "Generation: seconds per output token after the first (requests of 2 or more tokens)",
    buckets=TOKEN_BUCKETS_S)
OUTPUT_TOKENS = Counter("slora_output_tokens", "Output tokens streamed to clients")
SCHEDULER_AVAILABLE = Gauge("slora_scheduler_available",
                            "1 while a scheduler (a replica) is available to this frontend")
REPLICAS_AVAILABLE = Gauge("slora_replicas_available",
                           "Replicas this frontend may route to (registered, health SERVING)")
ADAPTER_RECORDS_STALE = Counter(
    "slora_adapter_records_served_stale",
    "Adapter look-ups answered from the frontend's cache while Redis was unavailable")


def on_call_done(method: str, code: str, seconds: float) -> None:
    """common/lifecycle.ServerCalls reports each finished call here."""
    REQUESTS.labels(method, code).inc()
    REQUEST_DURATION.labels(method).observe(seconds)
