"""Deadlines and overload through the whole stack, made deterministic by pausing the
scheduler (its Pause RPC: no step is planned, so every submission waits in the queue):
a bounded queue refuses the excess at once with RESOURCE_EXHAUSTED and a retry hint, a
client deadline ends a request and frees its pages, and a request that cannot meet its
deadline is refused at once (early abort)."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from helpers_peft import make_tiny_llama
from helpers_stack import Stack, generate_request, stream_outcome, worker_argv
from slora.client import ResourceExhaustedError
from slora.v1 import generation_pb2_grpc

QUEUE_LEN = 8
MAX_NUM_SEQS = 2
LONG = 400
"""Output tokens of a request that runs long."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=3)
    stack = Stack(str(root), base,
                  worker_argv(base, max_model_len=512, max_num_seqs=MAX_NUM_SEQS),
                  ["--max-queue-len", str(QUEUE_LEN)]).start_all()
    yield stack
    stack.pause(False)
    stack.stop_all()


@pytest.fixture
def paused(stack):
    """The scheduler paused for the test, resumed and idle after it."""
    with stack.paused():
        yield stack


async def concurrently(stack: Stack, calls):
    """Runs `calls(stub, metadata)` (a list of coroutines) on one channel."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return await asyncio.gather(*calls(stub, stack.call_metadata()))


def test_ten_requests_on_a_paused_worker_with_a_queue_of_8_refuse_exactly_two(paused):
    """Scheduler paused, queue bounded at 8: of 10 concurrent requests, 8 wait and exactly
    2 get RESOURCE_EXHAUSTED at once, each with a `grpc-retry-pushback-ms` trailer (a
    positive integer) passed through by the frontend; once resumed, the 8 are served."""
    stack = paused

    async def run():
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            tasks = [asyncio.create_task(stream_outcome(
                stub, generate_request([5 + i, 6, 7], 4), metadata=stack.call_metadata(),
                timeout=120)) for i in range(10)]
            while sum(t.done() for t in tasks) < 2:  # the refusals come at once
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # no third one
            num_done = sum(t.done() for t in tasks)
            waiting = stack.stats()["num_waiting"]
            stack.pause(False)
            return num_done, waiting, await asyncio.gather(*tasks)

    num_done, waiting, outcomes = asyncio.run(run())
    refused = [o for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    assert (num_done, waiting) == (2, QUEUE_LEN)
    assert len(refused) == 2 and len(served) == 8, [(o.code, o.details) for o in outcomes]
    for o in refused:
        assert "queue full: 8 requests waiting, limit 8" in o.details, o.details
        assert int(o.trailers["grpc-retry-pushback-ms"]) > 0, o.trailers
        assert o.seconds < 2.0, f"refused after {o.seconds:.2f} s"
    assert all(len(o.token_ids) == 4 for o in served)
    print(f"FIGURE paused queue of 8, 10 requests: refused {len(refused)}, in "
          f"{[round(o.seconds * 1000, 1) for o in refused]} ms, pushback "
          f"{[o.trailers['grpc-retry-pushback-ms'] for o in refused]} ms; served {len(served)}")


def test_the_sdk_exposes_the_retry_hint_and_does_not_retry_a_full_queue(paused):
    """RESOURCE_EXHAUSTED reaches the SDK as ResourceExhaustedError with `retry_after_s`
    from the trailer; the SDK retries only UNAVAILABLE, so it fails on the first try."""
    stack = paused
    with stack.client(retries=3) as c:
        streams = [c.stream([9, i], max_new_tokens=2) for i in range(QUEUE_LEN)]
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(QUEUE_LEN) as pool:
            waiting = [pool.submit(lambda s=s: [e.token_ids for e in s]) for s in streams]
            stack.wait_for_stats(lambda v: v["num_waiting"] == QUEUE_LEN)
            start = time.monotonic()
            with pytest.raises(ResourceExhaustedError) as err:
                c.generate([9, 99], max_new_tokens=2)
            elapsed = time.monotonic() - start
            stack.pause(False)
            assert all(f.result(timeout=60) for f in waiting)
    assert err.value.retry_after_s is not None and err.value.retry_after_s > 0, err.value
    assert elapsed < 1.0, f"the SDK took {elapsed:.2f} s: it retried RESOURCE_EXHAUSTED"


def test_a_client_deadline_ends_a_running_request_and_frees_its_pages(paused):
    """A stream with a deadline gets its first token, then the scheduler pauses: at the
    deadline the client gets DEADLINE_EXCEEDED, and the scheduler (still paused, so no step
    runs) has already let go of the request and its KV pages. (The deadline is 3x the time
    the request needs, so early abort lets it in.)"""
    stack = paused
    num_tokens = 100
    deadline_s = max(2.0, 3 * num_tokens * stack.stats()["step_time_us"] / 1e6)
    stack.pause(False)

    async def run():
        async def pause_now():
            stack.pause(True)

        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            outcome = await stream_outcome(
                stub, generate_request([4, 5, 6], num_tokens), metadata=stack.call_metadata(),
                timeout=deadline_s, on_first_token=pause_now)
            return outcome, stack.wait_for_stats(
                lambda v: v["num_running"] == 0 and v["pages_kv"] == 0, timeout_s=2.0)

    outcome, after = asyncio.run(run())
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
    assert outcome.first_token_s is not None, outcome
    assert deadline_s - 0.1 < outcome.seconds < deadline_s + 1.0, outcome
    assert after["num_running"] == 0 and after["pages_kv"] == 0, after
    print(f"FIGURE running request, {deadline_s:.2f} s deadline: DEADLINE_EXCEEDED after "
          f"{outcome.seconds:.2f} s; pool after: kv {after['pages_kv']}, running "
          f"{after['num_running']}")


def test_a_deadline_ends_a_waiting_request_and_leaves_the_queue(paused):
    """A request waiting behind a paused scheduler leaves the queue when its deadline
    passes: the scheduler gets the deadline with the call, and the call's end cancels it."""
    stack = paused

    async def run():
        return await concurrently(stack, lambda stub, md: [stream_outcome(
            stub, generate_request([4, 5], 4), metadata=md, timeout=1.0)])

    (outcome,) = asyncio.run(run())
    after = stack.wait_for_stats(lambda v: v["num_waiting"] == 0, timeout_s=2.0)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
    assert after["num_waiting"] == 0, after


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once(paused):
    """Early abort: with 6 long requests queued (2 run at a time) and the step time
    measured, a long request whose deadline is half the estimated time it needs is refused
    with DEADLINE_EXCEEDED ("early abort") at once, long before its deadline; one whose
    deadline is twice the estimate is queued."""
    stack = paused
    stack.pause(False)
    with stack.client() as c:  # measure the step time
        c.generate([3, 4, 5], max_new_tokens=32, ignore_eos=True)
    stack.pause(True)
    step_s = stack.stats()["step_time_us"] / 1e6
    assert step_s > 0
    num_queued = 6
    # Slots free at steps LONG, LONG, 2 LONG, 2 LONG, 3 LONG, 3 LONG; the next waits for
    # 3 LONG and runs LONG more (deadlines.py's simulation).
    estimate_s = (num_queued // MAX_NUM_SEQS + 1) * LONG * step_s

    async def run():
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            md = stack.call_metadata()
            queued = [asyncio.create_task(stream_outcome(
                stub, generate_request([7, i], LONG), metadata=md, timeout=600))
                for i in range(num_queued)]
            while stack.stats()["num_waiting"] < num_queued:
                await asyncio.sleep(0.02)
            hopeless = await stream_outcome(stub, generate_request([8, 1], LONG),
                                            metadata=md, timeout=max(estimate_s / 2, 0.5))
            hopeful = asyncio.create_task(stream_outcome(
                stub, generate_request([8, 2], LONG), metadata=md, timeout=2 * estimate_s + 5))
            await asyncio.sleep(0.3)
            waiting = stack.stats()["num_waiting"]
            for task in [*queued, hopeful]:
                task.cancel()
            await asyncio.gather(*queued, hopeful, return_exceptions=True)
            return hopeless, waiting

    hopeless, waiting = asyncio.run(run())
    assert hopeless.code == grpc.StatusCode.DEADLINE_EXCEEDED, hopeless
    assert "early abort" in hopeless.details, hopeless.details
    assert hopeless.seconds < max(estimate_s / 4, 0.25), hopeless
    assert waiting == num_queued + 1, waiting
    print(f"FIGURE early abort: estimate {estimate_s:.2f} s ({step_s * 1000:.2f} ms a step), "
          f"deadline {max(estimate_s / 2, 0.5):.2f} s, refused after "
          f"{hopeless.seconds * 1000:.1f} ms")
