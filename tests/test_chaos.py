"""Chaos with real processes on loopback: kill -9 the worker and the scheduler under `slora
up`'s supervision, kill -9 Redis right after acknowledged registrations, 200 clients that
vanish mid-stream, and 60 s of overload at 4x capacity. Each test prints the figures that
docs/RELIABILITY.md quotes (`pytest -s tests/test_chaos.py | grep FIGURE`)."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_stack import Outcome, Stack, generate_request, stream_outcome, worker_argv
from helpers_up import frontend_health, signal_mid_stream, start_slora_up
from slora.common.internal_auth import SECRET_FILE_NAME, call_metadata, load_or_create_secret
from slora.client import Client, UnavailableError
from slora.v1 import generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def figure(name: str, value) -> None:
    print(f"FIGURE {name}: {value}", flush=True)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)] if values else 0.0


@pytest.fixture(scope="module")
def slora_up(tmp_path_factory):
    root = tmp_path_factory.mktemp("slora-up")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=21)
    up = start_slora_up(str(root / "data"), base)
    try:
        yield up
    finally:
        up.stop()


def test_worker_killed_mid_stream_ends_streams_then_slora_up_restarts_it(slora_up):
    """kill -9 of the worker while 4 streams run: each ends with UNAVAILABLE within 5 s;
    `slora up` restarts the worker; the scheduler takes it back with an empty pool (no page
    of the old requests left) and new requests succeed."""
    up = slora_up
    index, worker = up.child("worker")
    _, scheduler = up.child("scheduler")
    outcomes, seconds = asyncio.run(signal_mid_stream(up, worker["pid"], signal.SIGKILL))
    killed_at = time.monotonic() - seconds
    for o in outcomes:
        assert o.code == grpc.StatusCode.UNAVAILABLE and "worker" in o.details, o
    assert seconds < 5.0, f"streams ended {seconds:.2f} s after the kill"

    up.child("worker", newer_than=index)
    restarted_s = time.monotonic() - killed_at
    secret = call_metadata(load_or_create_secret(os.path.join(up.data_dir, SECRET_FILE_NAME)))
    with grpc.insecure_channel(f"127.0.0.1:{scheduler['port']}") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        deadline = time.monotonic() + 30
        while True:
            stats = dict(stub.Stats(scheduler_pb2.StatsRequest(), timeout=5,
                                    metadata=secret).values)
            if stats["worker_available"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    back_s = time.monotonic() - killed_at
    assert stats["worker_available"] == 1, stats
    assert stats["pages_kv"] == 0 and stats["num_running"] == 0, stats
    assert stats["pages_free"] + stats["pages_adapter"] == stats["pages_total"], stats
    with Client(up.address, api_key=up.api_key, timeout_s=60) as c:
        assert len(c.generate([5, 6, 7], max_new_tokens=5, ignore_eos=True).token_ids) == 5
    figure("worker kill -9: last stream ended with UNAVAILABLE after (s)", round(seconds, 3))
    figure("worker kill -9: restarted by slora up after (s)", round(restarted_s, 2))
    figure("worker kill -9: scheduler serving again after (s)", round(back_s, 2))


def test_scheduler_killed_makes_the_frontend_unavailable_until_it_is_back(slora_up):
    """kill -9 of the scheduler while 4 streams run: each ends with UNAVAILABLE within 5 s,
    the frontend's health says NOT_SERVING and a new request gets UNAVAILABLE until `slora
    up` has restarted the scheduler; then health is SERVING and requests succeed."""
    up = slora_up
    index, scheduler = up.child("scheduler")
    outcomes, seconds = asyncio.run(signal_mid_stream(up, scheduler["pid"], signal.SIGKILL))
    killed_at = time.monotonic() - seconds
    for o in outcomes:
        assert o.code == grpc.StatusCode.UNAVAILABLE, o
    assert seconds < 5.0, f"streams ended {seconds:.2f} s after the kill"

    statuses = []  # (seconds since the kill, frontend health)
    while up.children["scheduler"][0] == index and time.monotonic() - killed_at < 120:
        statuses.append((time.monotonic() - killed_at, frontend_health(up.address)))
        time.sleep(0.05)
    with Client(up.address, api_key=up.api_key, retries=0, timeout_s=30) as c:
        refused = None
        if up.children["scheduler"][0] == index:
            with pytest.raises(UnavailableError) as refused:
                c.generate([5, 6], max_new_tokens=2)
    up.child("scheduler", newer_than=index)
    while frontend_health(up.address) != SERVING:
        assert time.monotonic() - killed_at < 60, "the frontend never served again"
        time.sleep(0.05)
    serving_s = time.monotonic() - killed_at
    with Client(up.address, api_key=up.api_key, timeout_s=60) as c:
        assert len(c.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    not_serving = [t for t, status in statuses if status != SERVING]
    assert statuses and len(not_serving) == len(statuses), (
        f"frontend said SERVING while its scheduler was down: {statuses[:5]}")
    figure("scheduler kill -9: last stream ended with UNAVAILABLE after (s)", round(seconds, 3))
    figure("scheduler kill -9: frontend NOT_SERVING from (s)", round(not_serving[0], 3))
    figure("scheduler kill -9: frontend SERVING again after (s)", round(serving_s, 2))
    del refused


# -- a stack of separate processes: Redis, disconnects, overload -----------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=23)
    adapters = [make_peft_adapter(base, str(root / f"ad-{i}"), r=4 << (i % 2),
                                  target_modules=["q_proj", "v_proj"], seed=i)
                for i in range(4)]
    stack = Stack(str(root), base,
                  worker_argv(base, max_model_len=512, num_pages=16384, max_num_seqs=256,
                              max_num_batched_tokens=1024),
                  adapter_roots=[str(root)],
                  frontend_args=["--max-requests-per-tenant", "0"]).start_all()
    stack.adapter_paths = adapters
    yield stack
    stack.stop_all()


def test_registrations_acknowledged_before_redis_is_killed_survive(stack):
    """100 registrations, each acknowledged, then kill -9 of Redis at once: meanwhile
    generation with an adapter already looked up goes on and a registration answers
    UNAVAILABLE; Redis restarted from its append-only file has all 100."""
    ids = [f"kept-{i}" for i in range(100)]
    with stack.client() as c:
        def register(i):
            return c.register_adapter(ids[i], stack.adapter_paths[i % 4]).adapter_id
        start = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(register, range(100))) == ids
        registered_s = time.monotonic() - start
        before = c.generate([5, 6, 7], adapter_id="kept-1", max_new_tokens=4).token_ids
        stack.kill("redis")
        during = c.generate([5, 6, 7], adapter_id="kept-1", max_new_tokens=4).token_ids
    with stack.client(retries=0) as c:
        with pytest.raises(UnavailableError):
            c.register_adapter("during-outage", stack.adapter_paths[0])
    stack.start("redis")
    with stack.client() as c:
        deadline = time.monotonic() + 15
        while True:
            try:
                listed = {a.adapter_id for a in c.list_adapters()}
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "Redis did not come back"
                time.sleep(0.2)
        assert set(ids) <= listed, f"lost: {sorted(set(ids) - listed)[:10]}"
        assert c.register_adapter("after-outage", stack.adapter_paths[1]).adapter_id
    assert during == before
    figure("redis kill -9: acknowledged registrations kept", f"{len(set(ids) & listed)}/100")
    figure("redis: 100 registrations (8 threads, WAITAOF each) took (s)", round(registered_s, 2))


DISCONNECTING_CLIENTS = """
import asyncio, sys, grpc
from slora.v1 import common_pb2, generation_pb2, generation_pb2_grpc
address, key, num = sys.argv[1], sys.argv[2], int(sys.argv[3])
md = (("authorization", "Bearer " + key),) if key else ()

async def stream(stub, i, started):
    req = generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(ids=[5 + i % 200, 6, 7]),
        sampling=common_pb2.SamplingParams(max_new_tokens=400, ignore_eos=True))
    async for event in stub.GenerateStream(req, metadata=md):
        if event.token_ids:
            started.release()
            break
    await asyncio.sleep(3600)  # hold the stream open, reading nothing more

async def main():
    channels = [grpc.aio.insecure_channel(address) for _ in range(8)]
    started = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(stream(generation_pb2_grpc.GenerationStub(
        channels[i % 8]), i, started)) for i in range(num)]
    for _ in range(num):
        await started.acquire()
    print("ALL STREAMING", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_two_hundred_clients_that_vanish_mid_stream_give_the_pool_back(stack):
    """200 streams from one client process, each past its first token, then kill -9 of
    that process (its connections drop, no cancel is sent): the pool is back to idle (no
    KV page, nothing running or waiting) within 10 s, and the stack serves."""
    client = subprocess.Popen(
        [sys.executable, "-P", "-c", DISCONNECTING_CLIENTS, stack.address, stack.admin_key, "200"],
        stdout=subprocess.PIPE, text=True)
    try:
        line = client.stdout.readline()
        assert line.strip() == "ALL STREAMING", line
        busy = stack.stats()
        killed_at = time.monotonic()
        client.kill()
        client.wait()
        idle = stack.wait_pool_idle(timeout_s=10)
        idle_s = time.monotonic() - killed_at
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert busy["num_running"] + busy["num_waiting"] >= 150 and busy["pages_kv"] > 0, busy
    assert idle["pages_kv"] == 0 and idle["num_running"] == 0 and idle["num_waiting"] == 0, idle
    with stack.client() as c:
        assert len(c.generate([8, 9], max_new_tokens=3, ignore_eos=True).token_ids) == 3
    figure("200 vanished clients: running+waiting when killed", busy["num_running"] + busy["num_waiting"])
    figure("200 vanished clients: pool idle after (s)", round(idle_s, 2))


# -- overload --------------------------------------------------------------------------------

OVERLOAD_SECONDS = 60
OVERLOAD_FACTOR = 4
OVERLOAD_SEQS = 4
OVERLOAD_QUEUE = 16
OVERLOAD_TOKENS = 64
DEADLINES_S = (0.5, 3.0)
EVENT_LOOP_SLACK_S = 0.25
"""Each request's deadline is drawn uniformly from this range (seeded)."""


async def measure_capacity(stack: Stack, seconds: float) -> float:
    """Completed requests per second with the batch kept full (2x its size in flight). Its
    requests' deadline is far beyond what they need on any machine: with a 30 s one, early
    abort rightly dropped a queued request when a loaded machine's steps made 30 s too short."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        done = 0
        end = time.monotonic() + seconds

        async def loop(i):
            nonlocal done
            while time.monotonic() < end:
                o = await stream_outcome(stub, generate_request([3 + i, 4, 5, 6, 7, 8, 9, 10],
                                                                OVERLOAD_TOKENS),
                                         metadata=stack.call_metadata(), timeout=300)
                assert o.code == grpc.StatusCode.OK, o
                done += 1

        start = time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(2 * OVERLOAD_SEQS)))
        return done / (time.monotonic() - start)


async def open_loop(stack: Stack, rate: float, seconds: float, rss_at):
    """Sends `rate` requests a second for `seconds` regardless of answers; each request has
    a random deadline. Returns [(deadline, Outcome)]; calls rss_at(t) at t = 10 s."""
    rng = random.Random(7)
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        md = stack.call_metadata()
        tasks = []

        async def one(i, deadline):
            return deadline, await stream_outcome(
                stub, generate_request([3 + i % 200, 4, 5, 6, 7, 8, 9, 10], OVERLOAD_TOKENS),
                metadata=md, timeout=deadline)

        start = time.monotonic()
        warm = False
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not warm and time.monotonic() - start > 10:
                warm = True
                rss_at()
            tasks.append(asyncio.create_task(one(i, rng.uniform(*DEADLINES_S))))
        sent_s = time.monotonic() - start
        return await asyncio.gather(*tasks), sent_s


@pytest.mark.slow
def test_overload_at_four_times_capacity_for_a_minute(stack):
    """The scheduler restarted with 4 slots and a queue of 16; its capacity measured; then
    4x that rate for 60 s, each request with a deadline in [0.5, 3] s. Every answer is OK,
    RESOURCE_EXHAUSTED (queue full) or DEADLINE_EXCEEDED; refusals come at once; admitted
    requests (queued and not refused at submission) meet their deadlines or are dropped
    early from the queue, with at most 1% missing them; goodput stays above 40% of capacity
    (no collapse); no process grows its resident memory by 10%; the pool is idle
    afterwards."""
    stack.scheduler_args = ["--max-num-seqs", str(OVERLOAD_SEQS),
                            "--max-queue-len", str(OVERLOAD_QUEUE)]
    stack.stop("scheduler")
    stack.start("scheduler")
    with stack.client(timeout_s=60) as c:  # the frontend reconnects; warm the path
        c.generate([1, 2, 3], max_new_tokens=OVERLOAD_TOKENS, ignore_eos=True)
    capacity = asyncio.run(measure_capacity(stack, 5.0))
    rate = OVERLOAD_FACTOR * capacity
    names = ("frontend", "scheduler", "worker")
    rss = {}
    outcomes, sent_s = asyncio.run(open_loop(
        stack, rate, OVERLOAD_SECONDS, lambda: rss.update({n: stack.rss_bytes(n) for n in names})))
    rss_end = {n: stack.rss_bytes(n) for n in names}
    idle = stack.wait_pool_idle(timeout_s=10)

    by_kind: dict[str, list[tuple[float, Outcome]]] = {}
    for deadline, o in outcomes:
        if o.code == grpc.StatusCode.OK:
            kind = "ok"
        elif o.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            kind = "queue_full"
        elif o.code == grpc.StatusCode.DEADLINE_EXCEEDED and "early abort" in o.details:
            kind = "early_abort_queue" if "from the queue" in o.details else "early_abort_submit"
        elif o.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            kind = "missed"
        else:
            kind = f"{o.code.name}: {o.details}"
        by_kind.setdefault(kind, []).append((deadline, o))
    counts = {k: len(v) for k, v in by_kind.items()}
    refusals = [o.seconds for k in ("queue_full", "early_abort_submit")
                for _, o in by_kind.get(k, [])]
    admitted = sum(counts.get(k, 0) for k in ("ok", "missed", "early_abort_queue"))
    # An OK came inside its gRPC deadline (the client library enforces it); `seconds` is
    # this test's event loop's reading, which under 4x overload runs hundreds of tasks and may
    # see the end of a stream later (seen: 0.59 s on a 0.5 s deadline): a slack for that.
    ok_late = [o for d, o in by_kind.get("ok", []) if o.seconds > d + EVENT_LOOP_SLACK_S]
    figure("overload: capacity (req/s, 4 slots, 64 tokens)", round(capacity, 1))
    figure("overload: offered (req/s)", round(len(outcomes) / sent_s, 1))
    figure("overload: outcomes", counts)
    figure("overload: goodput (req/s)", round(counts.get("ok", 0) / OVERLOAD_SECONDS, 1))
    figure("overload: refusal latency p50/p99/max (ms)",
           [round(1000 * percentile(refusals, q), 1) for q in (0.5, 0.99, 1.0)])
    figure("overload: RSS MiB at 10 s -> end",
           {n: (rss[n] >> 20, rss_end[n] >> 20) for n in names})
    assert set(counts) <= {"ok", "queue_full", "early_abort_submit", "early_abort_queue",
                           "missed"}, counts
    assert counts.get("queue_full", 0) > 0 and counts.get("ok", 0) > 0, counts
    assert percentile(refusals, 0.99) < 0.5, f"refusals p99 {percentile(refusals, 0.99):.3f} s"
    assert counts.get("missed", 0) <= 0.01 * admitted, counts
    assert counts.get("ok", 0) >= 0.4 * capacity * OVERLOAD_SECONDS, "goodput collapsed"
    assert not ok_late
    for n in names:
        assert rss_end[n] < 1.10 * rss[n], f"{n}: RSS {rss[n] >> 20} -> {rss_end[n] >> 20} MiB"
    assert idle["pages_kv"] == 0 and idle["num_running"] == 0 and idle["num_waiting"] == 0, idle
