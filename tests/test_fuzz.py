"""Fuzzing a running stack through its public ports: 5,000 hypothesis-generated calls to
every public method (helpers_strategies.py), then 500 frames of garbage (gRPC messages that
are not protobuf, and raw HTTP/2 frames), and 2,000 requests to the OpenAI HTTP API
(helpers_http_strategies.py: every endpoint, random JSON, garbage bodies, bad keys), none of
which may get a 5xx but a 504 past the deadline it asked for. No process dies; every answer is OK or one of the
documented error codes (docs/RELIABILITY.md); UNKNOWN, which means a handler raised, fails,
and INTERNAL is allowed only for a message that does not parse; the pool is idle at the
end and the stack serves."""
from __future__ import annotations

import asyncio
import collections
import json
import random
import socket
import struct

import aiohttp
import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers_http_strategies import http_request
from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_stack import Stack, worker_argv
from helpers_strategies import GARBAGE_MESSAGES, Call, public_call

NUM_EXAMPLES = 100
CALLS_PER_EXAMPLE = 50
"""Sent concurrently: 5,000 calls in all."""
NUM_GARBAGE_MESSAGES = 400
NUM_RAW_CONNECTIONS = 50
RAW_FRAMES_PER_CONNECTION = 2
"""400 + 50 x 2 = 500 frames of garbage."""
CALL_TIMEOUT_S = 60.0
ADAPTER_IDS = ["fz-0", "fz-1"]

DOCUMENTED_CODES = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
}
"""What a well-formed call may get from a healthy stack (docs/RELIABILITY.md)."""
GARBAGE_CODES = DOCUMENTED_CODES | {grpc.StatusCode.INTERNAL}
"""INTERNAL: "Exception deserializing request!", a message that does not parse."""
FUZZ_SETTINGS = settings(max_examples=NUM_EXAMPLES, deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(HealthCheck))
"""Derandomized: CI fuzzes the same 5,000 calls every run."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=31)
    adapter_dir = make_peft_adapter(base, str(root / "adapter"), r=4, seed=1)
    stack = Stack(str(root), base, worker_argv(base, max_model_len=64),
                  adapter_roots=[str(root)]).start_all()
    stack.adapter_dir = adapter_dir
    with stack.client() as c:
        for adapter_id in ADAPTER_IDS:
            c.register_adapter(adapter_id, adapter_dir)
    stack.idle_pages = stack.wait_pool_idle()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


STREAMING = {"/slora.v1.Generation/GenerateStream": "response",
             "/slora.v1.Adapters/Upload": "request"}


class Channels:
    """An asyncio channel, and a sync one for client streams: when the server answers
    before reading every message, grpc.aio's client reports its own failed write as
    INTERNAL ("Internal error from Core", grpc/grpc#36066) instead of the server's status;
    the sync client reports the server's."""

    def __init__(self, loop, address: str):
        options = [("grpc.max_send_message_length", 64 << 20)]
        self.aio = loop.run_until_complete(_aio_channel(address, options))
        self.sync = grpc.insecure_channel(address, options=options)

    def close(self, loop) -> None:
        loop.run_until_complete(self.aio.close())
        self.sync.close()


async def _aio_channel(address, options) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=options)


def _client_stream(channels: Channels, call: Call, metadata, serialize):
    fn = channels.sync.stream_unary(call.method, request_serializer=serialize,
                                    response_deserializer=None)
    try:
        fn(iter(call.request), metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def outcome(channels: Channels, call: Call, metadata,
                  serialize=None) -> tuple[grpc.StatusCode, str]:
    streaming = STREAMING.get(call.method, "unary")
    serialize = serialize or (lambda m: m.SerializeToString())
    if streaming == "request":
        return await asyncio.to_thread(_client_stream, channels, call, metadata, serialize)
    kind = channels.aio.unary_stream if streaming == "response" else channels.aio.unary_unary
    fn = kind(call.method, request_serializer=serialize, response_deserializer=None)
    try:
        if streaming == "response":
            async for _ in fn(call.request, metadata=metadata, timeout=CALL_TIMEOUT_S):
                pass
        else:
            await fn(call.request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def all_outcomes(channels, calls: list[Call], metadata, serialize=None):
    return await asyncio.gather(*(outcome(channels, c, metadata, serialize) for c in calls))


def test_five_thousand_fuzzed_calls_get_ok_or_a_documented_code(stack, loop):
    """100 examples of 50 concurrent calls, each a random public method with random fields
    (helpers_strategies.py), with the admin key: each answer is OK or a documented code."""
    channels = Channels(loop, stack.address)
    md = stack.call_metadata()
    codes: collections.Counter = collections.Counter()
    calls_strategy = st.lists(public_call(ADAPTER_IDS, stack.adapter_dir),
                              min_size=CALLS_PER_EXAMPLE, max_size=CALLS_PER_EXAMPLE)

    @FUZZ_SETTINGS
    @given(st.data())
    def fuzz(data):
        calls = data.draw(calls_strategy)
        answers = loop.run_until_complete(all_outcomes(channels, calls, md))
        for call, (code, details) in zip(calls, answers):
            codes[code.name] += 1
            assert code in DOCUMENTED_CODES, (
                f"{call.method} got {code.name} ({details}) for {str(call.request)[:600]!r}")

    try:
        fuzz()
    finally:
        channels.close(loop)
    print(f"FIGURE fuzz: answers by code: {dict(codes)}")
    assert codes["UNKNOWN"] == 0, codes  # a handler raised
    assert sum(codes.values()) >= NUM_EXAMPLES * CALLS_PER_EXAMPLE
    assert codes["OK"] > 500 and codes["INVALID_ARGUMENT"] > 500, codes


NUM_HTTP_EXAMPLES = 40
"""x CALLS_PER_EXAMPLE concurrent requests: 2,000 in all."""
HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 409, 413, 429}
"""What a request may get from a healthy stack; 504 too when it sent a deadline."""


async def http_outcome(session: aiohttp.ClientSession, base_url: str, call):
    """(status, the statuses of error events in an SSE body) of one request."""
    async with session.request(call.method, base_url + call.path, data=call.body,
                               headers=call.headers) as response:
        body = await response.read()
        streamed = response.content_type == "text/event-stream"
    if not streamed:
        return response.status, [], body
    events = [line[len(b"data: "):] for line in body.split(b"\n")
              if line.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]", body[-300:]
    return response.status, [json.loads(e)["error"]["status"] for e in events[:-1]
                             if b'"error"' in e and "error" in json.loads(e)], body[-600:]


def test_two_thousand_fuzzed_http_requests_get_no_server_error(stack, loop):
    """40 examples of 50 concurrent HTTP requests (helpers_http_strategies.py): each status
    is a documented one (no 5xx; 504 only for a request that sent x-slora-timeout-s), every
    SSE stream ends with [DONE] and carries no 5xx error event, and the connection is
    never dropped."""
    base_url = f"http://127.0.0.1:{stack.http_port}"
    statuses: collections.Counter = collections.Counter()
    calls_strategy = st.lists(http_request(["base", *ADAPTER_IDS], stack.adapter_dir,
                                           stack.admin_key),
                              min_size=CALLS_PER_EXAMPLE, max_size=CALLS_PER_EXAMPLE)

    async def run(calls):
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await asyncio.gather(*(http_outcome(session, base_url, c) for c in calls))

    # Not shrunk: an example is 50 concurrent calls, and a failure is reported as drawn.
    @settings(FUZZ_SETTINGS, max_examples=NUM_HTTP_EXAMPLES,
              phases=[Phase.explicit, Phase.generate])
    @given(st.data())
    def fuzz(data):
        calls = data.draw(calls_strategy)
        answers = loop.run_until_complete(run(calls))
        for call, (status, stream_errors, body) in zip(calls, answers):
            statuses[status] += 1
            allowed = HTTP_STATUSES | ({504} if call.timeout_sent else set())
            assert status in allowed and set(stream_errors) <= allowed, (
                f"{call.method} {call.path} got {status} {stream_errors} ({body!r:.600}) for "
                f"{call.headers} {call.body!r:.600}; the frontend's log ends with "
                f"{stack.stderr('frontend')[-3000:]}")

    fuzz()
    print(f"FIGURE fuzz: HTTP answers by status: {dict(statuses)}")
    assert sum(statuses.values()) >= NUM_HTTP_EXAMPLES * CALLS_PER_EXAMPLE
    assert statuses[200] > 200 and statuses[400] > 200, statuses


PUBLIC_METHODS = ["/slora.v1.Generation/Generate", "/slora.v1.Generation/GenerateStream",
                  "/slora.v1.Adapters/Register", "/slora.v1.Adapters/Upload",
                  "/slora.v1.Adapters/Get", "/slora.v1.Adapters/List",
                  "/slora.v1.Adapters/Delete", "/slora.v1.Keys/List", "/slora.v1.Keys/Revoke",
                  "/slora.v1.Keys/Create", "/grpc.health.v1.Health/Check"]


def test_garbage_messages_get_internal_or_a_documented_code(stack, loop):
    """400 gRPC messages of raw bytes that are mostly not valid protobuf (invalid UTF-8 in
    strings, impossible wire types, overlong varints, lengths past the end), each sent to a
    random public method: INTERNAL (unparseable) or a documented code, never UNKNOWN."""
    channels = Channels(loop, stack.address)
    md = stack.call_metadata()
    codes: collections.Counter = collections.Counter()
    sent = 0

    @settings(FUZZ_SETTINGS, max_examples=NUM_GARBAGE_MESSAGES // 20)
    @given(st.lists(st.tuples(st.sampled_from(PUBLIC_METHODS), GARBAGE_MESSAGES),
                    min_size=20, max_size=20))
    def fuzz(messages):
        nonlocal sent
        calls = [Call(m, [b] if STREAMING.get(m) == "request" else b) for m, b in messages]
        answers = loop.run_until_complete(
            all_outcomes(channels, calls, md, serialize=lambda b: b))
        sent += len(calls)
        for call, (code, details) in zip(calls, answers):
            codes[code.name] += 1
            assert code in GARBAGE_CODES, f"{call.method} got {code.name} ({details}) " \
                                          f"for {call.request!r:.300}"

    try:
        fuzz()
    finally:
        channels.close(loop)
    print(f"FIGURE fuzz: garbage messages by code: {dict(codes)}")
    assert sent >= NUM_GARBAGE_MESSAGES


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream_id & 0x7FFFFFFF) + payload


def garbage_connection(rng: random.Random) -> bytes:
    """What one raw connection sends: frames of random type, flags, stream and payload
    (HEADERS with random HPACK, DATA on unopened streams, unknown types, bad SETTINGS),
    after the preface or instead of it."""
    frames = []
    for _ in range(RAW_FRAMES_PER_CONNECTION):
        kind = rng.choice([0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9, rng.randrange(256)])
        payload = rng.randbytes(rng.choice([0, 1, 5, 6, 8, 64, 300]))
        frames.append(frame(kind, rng.randrange(256), rng.choice([0, 1, 3, 2 ** 31 - 1]),
                            payload))
    head = rng.choice([PREFACE + frame(0x4, 0, 0, b""), PREFACE, b"", rng.randbytes(24)])
    return head + b"".join(frames)


def test_raw_http2_garbage_closes_connections_and_nothing_else(stack):
    """50 connections to the public port, each sending 2 random HTTP/2 frames (100 frames):
    the server answers or closes each connection and keeps serving."""
    rng = random.Random(5)
    for _ in range(NUM_RAW_CONNECTIONS):
        with socket.create_connection(("127.0.0.1", stack.ports["frontend"]), timeout=5) as s:
            s.sendall(garbage_connection(rng))
            s.settimeout(1.0)
            try:
                while s.recv(65536):
                    pass
            except (socket.timeout, ConnectionResetError):
                pass
    with stack.client() as c:
        assert len(c.generate([5, 6, 7], max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_after_the_fuzz_every_process_lives_and_the_pool_is_idle(stack):
    """Runs last: all four processes are alive, none logged a traceback (a handler that
    raised, even one whose caller got a documented code), the pool holds no KV page and
    nothing runs or waits, and a request with an adapter is served."""
    for name in ("redis", "worker", "scheduler", "frontend"):
        assert stack.alive(name), f"{name} died"
    for name in ("worker", "scheduler", "frontend"):
        raised = [line for line in stack.log_lines(name) if "exc" in line]
        assert raised == [], f"{name} logged {len(raised)} tracebacks, first: {raised[:1]}"
    idle = stack.wait_pool_idle(timeout_s=30)
    assert idle["pages_kv"] == 0 and idle["num_running"] == 0 and idle["num_waiting"] == 0, idle
    assert idle["pages_free"] + idle["pages_adapter"] == idle["pages_total"], idle
    with stack.client() as c:
        assert len(c.generate([5, 6], adapter_id="fz-0", max_new_tokens=3,
                              ignore_eos=True).token_ids) == 3
