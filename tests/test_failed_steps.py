"""A whole step that fails on the worker (real processes): the requests in it are recomputed
once and finish with the tokens an undisturbed run gives; in a second failed step they end
UNAVAILABLE, each with a message about itself, never the worker's error text. The failure
is real: a second Steps stream (opened with the deployment's secret, as a restarted
scheduler would) supersedes the scheduler's, so the worker answers its next command "not
run" and empties itself."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from helpers_peft import make_tiny_llama
from helpers_stack import Stack, streams_past_first_token, worker_argv
from slora.v1 import common_pb2, generation_pb2, generation_pb2_grpc, worker_pb2_grpc

NUM_STREAMS = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("failed-steps")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=51)
    stack = Stack(str(root), base, worker_argv(base, max_model_len=512)).start_all()
    yield stack
    stack.stop_all()


def requests(max_new_tokens: int) -> list[generation_pb2.GenerateRequest]:
    return [generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(ids=[7 + i, 8, 9]),
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
        for i in range(NUM_STREAMS)]


def supersede_the_schedulers_stream(stack: Stack) -> None:
    """Opens (and at once closes) a Steps stream on the worker: it becomes the worker's
    session, so the scheduler's next command fails there."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['worker']}") as channel:
        list(worker_pb2_grpc.WorkerStub(channel).Steps(
            iter(()), metadata=stack.internal_metadata(), timeout=30))


async def run(stack: Stack, max_new_tokens: int, num_failures: int):
    """Streams past their first token, then `num_failures` failed steps (each once the
    scheduler has run 3 more steps since the last); returns the outcomes."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        streams = await streams_past_first_token(
            generation_pb2_grpc.GenerationStub(channel),
            [(r, stack.call_metadata()) for r in requests(max_new_tokens)])
        for k in range(num_failures):
            if k:
                await asyncio.to_thread(
                    stack.wait_for_stats, lambda v: v["num_steps"] >= steps + 3
                    and v["num_running"] == NUM_STREAMS, 30)
            steps = stack.stats()["num_steps"]
            await asyncio.to_thread(supersede_the_schedulers_stream, stack)
        return await asyncio.gather(*streams)


def test_a_failed_step_is_retried_once_and_a_second_ends_its_requests_unavailable(stack):
    """One failed step: the 4 streams get all 200 tokens, the same as undisturbed; two
    failed steps: each ends UNAVAILABLE naming its own request and "not retried again"."""
    undisturbed = asyncio.run(run(stack, 200, 0))
    retried = asyncio.run(run(stack, 200, 1))
    for clean, o in zip(undisturbed, retried):
        assert o.code == grpc.StatusCode.OK, o
        assert o.token_ids == clean.token_ids
    failed_twice = asyncio.run(run(stack, 400, 2))
    for o in failed_twice:
        assert o.code == grpc.StatusCode.UNAVAILABLE, o
        assert "steps that failed on the worker" in o.details, o.details
        assert "Steps stream" not in o.details, o.details  # the worker's text stays in its log
    idle = stack.wait_pool_idle()
    assert idle["pages_kv"] == 0 and idle["num_running"] == 0, idle
