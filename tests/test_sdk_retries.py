"""The SDK's retry policy against a scripted server: only UNAVAILABLE is retried, a bounded
number of times, never a stream that has delivered a token; a full queue's retry hint
reaches the caller as `retry_after_s`."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf

import grpc
import pytest

from slora.client import (
    AsyncClient, Client, ResourceExhaustedError, UnavailableError,
)
from slora.v1 import generation_pb2

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class ScriptedGeneration:
    """Answers the n-th call with script[n]: a status code to abort with, "ok", or
    "token-then-unavailable" (streams only)."""

    def __init__(self, script: list):
        self.script = script
        self.num_calls = 0

    def _next(self):
        step = self.script[min(self.num_calls, len(self.script) - 1)]
        self.num_calls += 1
        return step

    def generate(self, request, context):
        step = self._next()
        if step != "ok":
            if step == grpc.StatusCode.RESOURCE_EXHAUSTED:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", "250"),))
            context.abort(step, f"scripted {step.name}")
        return generation_pb2.GenerateResponse(text="hi", token_ids=[1, 2])

    def generate_stream(self, request, context):
        step = self._next()
        if step == "ok":
            yield generation_pb2.GenerateEvent(token_ids=[1])
            return
        if step == "token-then-unavailable":
            yield generation_pb2.GenerateEvent(token_ids=[1])
            step = UNAVAILABLE
        context.abort(step, f"scripted {step.name}")


@pytest.fixture
def server():
    servers = []

    def start(script):
        service = ScriptedGeneration(script)
        s = grpc.server(cf.ThreadPoolExecutor(4))
        s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("slora.v1.Generation", {
            "Generate": grpc.unary_unary_rpc_method_handler(
                service.generate, generation_pb2.GenerateRequest.FromString,
                generation_pb2.GenerateResponse.SerializeToString),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                service.generate_stream, generation_pb2.GenerateRequest.FromString,
                generation_pb2.GenerateEvent.SerializeToString)}),))
        service.address = f"127.0.0.1:{s.add_insecure_port('127.0.0.1:0')}"
        s.start()
        servers.append(s)
        return service

    yield start
    for s in servers:
        s.stop(0)


def test_unavailable_is_retried_until_it_succeeds(server):
    service = server([UNAVAILABLE, UNAVAILABLE, "ok"])
    with Client(service.address, retries=3) as c:
        assert c.generate([5]).token_ids == [1, 2]
    assert service.num_calls == 3


def test_retries_are_bounded(server):
    service = server([UNAVAILABLE])
    with Client(service.address, retries=2) as c, pytest.raises(UnavailableError):
        c.generate([5])
    assert service.num_calls == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL])
def test_other_codes_are_not_retried(server, code):
    service = server([code, "ok"])
    with Client(service.address, retries=3) as c, pytest.raises(Exception) as err:
        c.generate([5])
    assert err.value.code == code and service.num_calls == 1
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert isinstance(err.value, ResourceExhaustedError) and err.value.retry_after_s == 0.25


def test_a_stream_is_retried_only_before_its_first_token(server):
    service = server([UNAVAILABLE, "ok"])
    with Client(service.address, retries=3) as c:
        assert [e.token_ids for e in c.stream([5])] == [[1]]
    assert service.num_calls == 2

    service = server(["token-then-unavailable", "ok"])
    with Client(service.address, retries=3) as c:
        tokens = []
        with pytest.raises(UnavailableError):
            for event in c.stream([5]):
                tokens += event.token_ids
    assert tokens == [1] and service.num_calls == 1


def test_the_async_client_follows_the_same_policy(server):
    retried = server([UNAVAILABLE, "ok"])
    delivered = server(["token-then-unavailable", "ok"])

    async def run():
        async with AsyncClient(retried.address, retries=3) as c:
            first = [e.token_ids async for e in c.stream([5])]
        async with AsyncClient(delivered.address, retries=3) as c:
            with pytest.raises(UnavailableError):
                async for _ in c.stream([5]):
                    pass
        return first

    assert asyncio.run(run()) == [[1]]
    assert retried.num_calls == 2 and delivered.num_calls == 1
