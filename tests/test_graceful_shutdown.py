"""SIGTERM drains the frontend and the scheduler (common/lifecycle.py): health goes
NOT_SERVING at once, new requests are refused with UNAVAILABLE, requests already running
finish, and the process exits once they have, or cancels them when the grace period is
over."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers_peft import make_tiny_llama
from helpers_procs import slora_module
from helpers_stack import Stack, generate_request, stream_outcome, worker_argv
from slora.v1 import generation_pb2_grpc

GRACE_S = 15.0
"""Long enough for the running streams on a loaded machine."""
SHORT_GRACE_S = 2.0
NUM_STREAMS = 4
NUM_TOKENS = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("shutdown")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=5)
    grace = ["--shutdown-grace-s", str(GRACE_S)]
    stack = Stack(str(root), base, worker_argv(base, max_model_len=512), grace,
                  frontend_args=grace).start_all()
    yield stack
    stack.stop_all()


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5).status


def wait_health(port: int, status: int, timeout_s: float = 10.0) -> float:
    """Seconds until the server's health says `status`."""
    start = time.monotonic()
    while health_status(port) != status:
        assert time.monotonic() - start < timeout_s, f"health never became {status}"
        time.sleep(0.05)
    return time.monotonic() - start


async def drain_while_streaming(stack: Stack, name: str):
    """Starts NUM_STREAMS streams; once each has a token, SIGTERMs `name`; then checks its
    health and sends one more request. Returns (streams, health seconds, refused)."""
    port = stack.ports[name]
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        md = stack.call_metadata()
        started = asyncio.Semaphore(0)

        async def on_first():
            started.release()

        streams = [asyncio.create_task(stream_outcome(
            stub, generate_request([5, i, 7], NUM_TOKENS), metadata=md, timeout=60,
            on_first_token=on_first)) for i in range(NUM_STREAMS)]
        for _ in range(NUM_STREAMS):
            acquired = asyncio.create_task(started.acquire())
            await asyncio.wait([acquired, *streams], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            assert acquired.done(), [s.result() for s in streams if s.done()]
        stack.procs[name].send_signal(signal.SIGTERM)
        health_s = await asyncio.to_thread(
            wait_health, port, health_pb2.HealthCheckResponse.NOT_SERVING)
        refused = await stream_outcome(stub, generate_request([9, 9], 2), metadata=md,
                                       timeout=10)
        return await asyncio.gather(*streams), health_s, refused


@pytest.mark.parametrize("name", ["frontend", "scheduler"])
def test_sigterm_finishes_running_requests_and_refuses_new_ones(stack, name):
    """SIGTERM mid-stream: health NOT_SERVING within a second, a new request UNAVAILABLE,
    every running stream gets all its tokens, and the process exits 0; restarted, it
    serves."""
    proc = stack.procs[name]
    streams, health_s, refused = asyncio.run(drain_while_streaming(stack, name))
    assert health_s < 1.0, f"NOT_SERVING after {health_s:.2f} s"
    assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
    for s in streams:
        assert s.code == grpc.StatusCode.OK and len(s.token_ids) == NUM_TOKENS, s
    assert proc.wait(GRACE_S + 5) == 0
    print(f"FIGURE SIGTERM {name}: NOT_SERVING after {health_s:.3f} s; {len(streams)} "
          f"running streams finished with {NUM_TOKENS} tokens each; new request "
          f"{refused.code.name}")
    stack.procs.pop(name)
    stack.start(name)
    wait_health(stack.ports["frontend"], health_pb2.HealthCheckResponse.SERVING)
    with stack.client() as c:
        assert len(c.generate([4, 5], max_new_tokens=3).token_ids) == 3


async def stuck_stream(stack: Stack, channel) -> asyncio.Task:
    """A stream of a request waiting in the paused scheduler's queue, as a task."""
    stub = generation_pb2_grpc.GenerationStub(channel)
    stream = asyncio.create_task(stream_outcome(
        stub, generate_request([5, 6], 4), metadata=stack.call_metadata(), timeout=60))
    await asyncio.to_thread(stack.wait_for_stats, lambda v: v["num_waiting"] == 1)
    return stream


def test_the_grace_period_bounds_the_drain(stack):
    """A request that cannot finish (the scheduler is paused) keeps the frontend draining
    for the grace period only (2 s here): then the stream ends with UNAVAILABLE saying the
    server is shutting down, and the process exits."""
    stack.stop("frontend")
    stack.frontend_args += ["--shutdown-grace-s", str(SHORT_GRACE_S)]
    stack.start("frontend")
    stack.pause(True)
    proc = stack.procs["frontend"]

    async def run():
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stream = await stuck_stream(stack, channel)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            outcome = await stream
            return outcome, time.monotonic() - start

    try:
        outcome, seconds = asyncio.run(run())
        assert proc.wait(GRACE_S) == 0  # the drain's bound is checked on the stream below
    finally:
        stack.pause(False)
        stack.procs.pop("frontend")
        stack.frontend_args = stack.frontend_args[:-2]
        stack.start("frontend")
    assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
    assert "the server is shutting down" in outcome.details, outcome
    assert SHORT_GRACE_S - 0.5 < seconds < SHORT_GRACE_S + 3.0, f"drained for {seconds:.2f} s"
    print(f"FIGURE SIGTERM frontend, grace {SHORT_GRACE_S} s, a stuck request: it ended "
          f"({outcome.code.name}) after {seconds:.2f} s")
    assert stack.wait_pool_idle()["num_waiting"] == 0


def test_a_call_to_a_draining_server_says_it_is_shutting_down(stack):
    """While the frontend drains (a stuck request holds it), `slora generate` is refused and
    says the server is shutting down, not "is the server up?"; once the request can finish,
    the frontend exits 0."""
    stack.pause(True)
    proc = stack.procs["frontend"]

    async def run():
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stream = await stuck_stream(stack, channel)
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_health, stack.ports["frontend"],
                                    health_pb2.HealthCheckResponse.NOT_SERVING)
            cli = await asyncio.to_thread(
                subprocess.run, slora_module(
                    "slora.client.cli", "generate", "Hi", "--address", stack.address,
                    "--api-key", stack.admin_key), capture_output=True, text=True, timeout=60)
            stack.pause(False)
            return cli, await stream

    try:
        cli, outcome = asyncio.run(run())
        assert proc.wait(GRACE_S + 5) == 0
    finally:
        stack.pause(False)
        stack.procs.pop("frontend")
        stack.start("frontend")
    assert cli.returncode == 1, cli
    assert "the server is shutting down" in cli.stderr, cli.stderr
    assert "is the server up" not in cli.stderr, cli.stderr
    assert outcome.code == grpc.StatusCode.OK, outcome
