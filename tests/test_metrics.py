"""Prometheus metrics and structured logs of every process, read while a load runs: each
process's metrics page (its port on the SLORA_READY line) parses with prometheus_client's
parser and has the metrics docs/RELIABILITY.md lists, with no adapter label; every log line
is one JSON object, and one request's id appears in the frontend's, the scheduler's and the
worker's lines."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_stack import Stack, worker_argv

NUM_ADAPTERS = 10
ADAPTER_SLOTS = 4
"""Fewer slots than adapters: the load loads and evicts adapters."""

EXPECTED = {
    "frontend": {
        "slora_requests": "counter", "slora_request_duration_seconds": "histogram",
        "slora_time_to_first_token_seconds": "histogram",
        "slora_time_per_output_token_seconds": "histogram",
        "slora_output_tokens": "counter", "slora_scheduler_available": "gauge",
        "slora_replicas_available": "gauge",
        "process_resident_memory_bytes": "gauge",
    },
    "scheduler": {
        "slora_queue_depth": "gauge", "slora_running_batch_size": "gauge",
        "slora_pool_pages": "gauge", "slora_pool_pages_total": "gauge",
        "slora_adapters_resident": "gauge", "slora_adapter_loads": "counter",
        "slora_adapter_evictions": "counter", "slora_step_time_seconds": "histogram",
        "slora_step_batch_size": "histogram", "slora_queue_wait_seconds": "histogram",
        "slora_scheduler_requests": "counter", "slora_worker_available": "gauge",
    },
    "worker": {
        "slora_worker_step_time_seconds": "histogram", "slora_adapters_host_memory": "gauge",
        "slora_host_cache_bytes": "gauge", "slora_host_cache_loads": "counter",
        "slora_host_cache_evictions": "counter", "slora_worker_requests": "gauge",
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=41)
    stack = Stack(str(root), base,
                  worker_argv(base, max_model_len=256, max_adapter_slots=ADAPTER_SLOTS),
                  adapter_roots=[str(root)]).start_all()
    try:
        with stack.client() as c:
            for i in range(NUM_ADAPTERS):
                path = make_peft_adapter(base, str(root / f"m-{i}"), r=2 + 2 * (i % 3),
                                         target_modules=["q_proj", "v_proj"], seed=i)
                c.register_adapter(f"m-{i}", path)
        yield stack
    finally:
        stack.stop_all()


def scrape(stack: Stack, name: str) -> dict[str, object]:
    """The process's metric families by name (counters without their _total suffix)."""
    return {f.name: f for f in text_string_to_metric_families(stack.metrics_text(name))}


def sample_values(family, suffix: str = "", **labels) -> list[float]:
    return [s.value for s in family.samples if s.name == family.name + suffix
            and all(s.labels.get(k) == v for k, v in labels.items())]


def run_load(stack: Stack, stop: threading.Event) -> int:
    """Streams across all adapters and the base, 16 at a time, until `stop`."""
    count = 0
    with stack.client() as c, cf.ThreadPoolExecutor(16) as pool:
        def one(i):
            adapter = None if i % 7 == 6 else f"m-{i % NUM_ADAPTERS}"
            return sum(len(e.token_ids) for e in c.stream(
                [3 + i % 50, 4, 5, 6], adapter_id=adapter, max_new_tokens=24,
                ignore_eos=True, request_id=f"load-{i}"))
        i = 0
        while not stop.is_set():
            assert all(n == 24 for n in pool.map(one, range(i, i + 32)))
            i, count = i + 32, count + 32
    return count


def test_every_process_serves_its_metrics_while_a_load_runs(stack):
    """While streams run: each process's metrics port answers, parses, and has its metrics;
    the scheduler shows a running batch and KV pages in use; afterwards the counters show
    the load (OK requests, token latencies, adapter loads and evictions, step times); no
    metric has an adapter label."""
    assert all(stack.metrics_ports[n] > 0 for n in ("frontend", "scheduler", "worker"))
    stop = threading.Event()
    with cf.ThreadPoolExecutor(1) as pool:
        load = pool.submit(run_load, stack, stop)
        busy = None
        deadline = time.monotonic() + 60
        while busy is None and time.monotonic() < deadline:
            families = scrape(stack, "scheduler")
            running = sample_values(families["slora_running_batch_size"])[0]
            kv_pages = sample_values(families["slora_pool_pages"], use="kv")[0]
            if running > 0 and kv_pages > 0:
                busy = (running, kv_pages)
            time.sleep(0.05)
        live = {name: scrape(stack, name) for name in EXPECTED}
        time.sleep(1.0)
        stop.set()
        num_requests = load.result(timeout=120)
    assert busy is not None, "the scheduler never showed a running batch"
    after = {name: scrape(stack, name) for name in EXPECTED}

    for name, expected in EXPECTED.items():
        for metric, kind in expected.items():
            assert metric in live[name], f"{name}: {metric} missing while the load ran"
            assert after[name][metric].type == kind, (name, metric, after[name][metric].type)
        for family in after[name].values():
            for sample in family.samples:
                assert not {"adapter", "adapter_id"} & set(sample.labels), (name, sample)

    front, sched, work = after["frontend"], after["scheduler"], after["worker"]
    ok_streams = sample_values(front["slora_requests"], "_total", method="GenerateStream",
                               code="OK")
    assert ok_streams and ok_streams[0] >= num_requests, ok_streams
    assert sample_values(front["slora_time_to_first_token_seconds"], "_count")[0] >= num_requests
    assert sample_values(front["slora_time_per_output_token_seconds"], "_count")[0] >= num_requests
    assert sample_values(front["slora_scheduler_available"]) == [1.0]
    pages = {use: sample_values(sched["slora_pool_pages"], use=use)[0]
             for use in ("free", "kv", "adapter")}
    assert sum(pages.values()) == sample_values(sched["slora_pool_pages_total"])[0]
    assert sample_values(sched["slora_adapter_loads"], "_total")[0] >= NUM_ADAPTERS
    assert sample_values(sched["slora_adapter_evictions"], "_total")[0] > 0
    assert sample_values(sched["slora_adapters_resident"], device="cpu")[0] <= ADAPTER_SLOTS
    assert sample_values(sched["slora_step_time_seconds"], "_count")[0] > 0
    assert sample_values(sched["slora_scheduler_requests"], "_total", outcome="length")[0] \
        >= num_requests
    assert sample_values(work["slora_worker_step_time_seconds"], "_count")[0] > 0
    assert sample_values(work["slora_adapters_host_memory"])[0] >= 1
    assert sample_values(work["slora_host_cache_loads"], "_total")[0] >= NUM_ADAPTERS
    print(f"FIGURE metrics: busy scheduler (running, kv pages) = {busy}; "
          f"{num_requests} streams; pages after: {pages}")


def test_logs_are_json_lines_carrying_the_request_id_through_every_process(stack):
    """Every stderr line of the frontend, scheduler and worker is one JSON object with ts,
    level, process, logger and msg; a request's id (the frontend makes it from the client's
    request_id) is on its frontend line, its scheduler line and its worker line."""
    with stack.client() as c:
        generation = c.generate([7, 8, 9], adapter_id="m-3", max_new_tokens=3,
                                request_id="trace-me")
    request_id = generation.request_id
    assert request_id.startswith("trace-me-"), request_id
    time.sleep(0.5)  # the worker and scheduler lines are written as the request ends
    seen = {}
    for name in ("frontend", "scheduler", "worker"):
        text = stack.stderr(name)
        lines = [line for line in text.splitlines() if line.strip()]
        entries = stack.log_lines(name)
        assert len(entries) == len(lines), (
            f"{name}: not JSON: {[l for l in lines if not l.startswith('{')][:3]}")
        for entry in entries:
            assert {"ts", "level", "process", "logger", "msg"} <= set(entry), entry
            assert entry["process"] == name, entry
        seen[name] = [e["msg"] for e in entries if e.get("request_id") == request_id]
    assert "request finished" in seen["frontend"], seen
    assert "request finished" in seen["scheduler"], seen
    assert "request started" in seen["worker"], seen
