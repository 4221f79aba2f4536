"""How a slora gRPC server starts serving and stops: the ready line, health, the accounting
of every call, and the graceful drain on SIGTERM. Used by the frontend and the scheduler.

Health (grpc.health.v1) says SERVING only while the process can do its job (the frontend:
its scheduler answers; the scheduler: its worker answers) and is not draining.

Drain (SIGTERM or SIGINT): health goes NOT_SERVING at once, so load balancers and
clients that watch it stop sending; every new call is refused with UNAVAILABLE ("shutting
down", which the SDK retries, reaching another replica or this one restarted); calls already
running go on until they end or the grace period runs out; then whatever is left ends with
UNAVAILABLE ("the server is shutting down ..."), and the server stops. Health checks and reflection are answered throughout and are not counted
as running calls (a Watch stream lasts as long as its watcher).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2

log = logging.getLogger("slora.lifecycle")

EXEMPT_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Calls neither refused while draining nor counted as running (their messages are
checked all the same)."""
STOP_GRACE_S = 1.0
"""What server.stop gives the calls still running when the drain's grace period is over."""
CUT_MESSAGE = ("the server is shutting down and its grace period is over: this call was cut; "
               "retry it")
"""UNAVAILABLE's message for a call still running when the drain ends (the SDK's
UnavailableError.shutting_down looks for "shutting down")."""
DEFAULT_SHUTDOWN_GRACE_S = 25.0
"""Running calls' time to finish after SIGTERM (Kubernetes' default kill comes after 30 s)."""


def python_module_command(module: str, *args) -> list[str]:
    """The command line running `python -P -m <module> <args>` with this interpreter.

    `-P` keeps the current directory off `sys.path`: started from a clone of this repo, a
    bare `-m` would make our top-level folders (`kernels/`, `worker/`, ...) importable by
    their bare names, and `kernels` is also a PyPI package that transformers imports. Every
    process slora starts goes through here."""
    return [sys.executable, "-P", "-m", module, *map(str, args)]


def ready_line(name: str, port: int, metrics_port: int, **ports: int) -> str:
    """The line a launcher waits for; keep its form: `SLORA_READY <name> port=N ...`.
    `ports`: more ports the process serves (http_port=N)."""
    more = "".join(f" {k}={v}" for k, v in ports.items())
    return (f"SLORA_READY {name} port={port} metrics_port={metrics_port}{more} "
            f"pid={os.getpid()}")


def _code_name(code) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


class _Unparseable:
    """Stands for a request message that did not parse."""

    def __init__(self, error: Exception):
        self.error = error


def _parse_or_flag(deserialize):
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, and anything a parser may raise
            return _Unparseable(e)
    return parse


async def _abort_unparseable(context, request: _Unparseable) -> None:
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"the request message does not parse: {request.error}")


async def _checked(requests, context):
    async for request in requests:
        if isinstance(request, _Unparseable):
            await _abort_unparseable(context, request)
        yield request


class ServerCalls(grpc.aio.ServerInterceptor):
    """Counts running calls, refuses new ones while draining, and reports each call's
    method, status code and duration to `on_done(method, code_name, seconds)`.

    A request message that does not parse gets INTERNAL (grpc.aio on its own answers UNKNOWN,
    the code of a handler that raised); so UNKNOWN stays the sign of a bug, which the fuzz
    test fails on."""

    def __init__(self, on_done=None):
        self.draining = False
        self.cutting = False
        """Set when the grace period is over: running calls end with UNAVAILABLE."""
        self.num_running = 0
        self._tasks: set[asyncio.Task] = set()
        """The tasks of the counted calls running."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_done = on_done

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        counted = not details.method.startswith(EXEMPT_METHOD_PREFIXES)
        method = details.method.rsplit("/", 1)[-1]
        kwargs = dict(request_deserializer=_parse_or_flag(handler.request_deserializer),
                      response_serializer=handler.response_serializer)
        for kind, make, request_streaming in (
                ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
                ("stream_unary", grpc.stream_unary_rpc_method_handler, True),
                ("unary_stream", grpc.unary_stream_rpc_method_handler, False),
                ("stream_stream", grpc.stream_stream_rpc_method_handler, True)):
            behavior = getattr(handler, kind)
            if behavior:
                # A streaming response comes from an async generator or from a coroutine
                # that calls context.write; grpc tells them apart by the function's kind.
                wrap = self._streaming if inspect.isasyncgenfunction(behavior) else self._unary
                return make(wrap(behavior, method, request_streaming, counted), **kwargs)
        return handler

    def _begin(self, counted: bool, cuttable: bool = True) -> float:
        """`cuttable`: a gRPC call, which cut_running ends with UNAVAILABLE."""
        if counted:
            self.num_running += 1
            self._idle.clear()
            if cuttable:
                self._tasks.add(asyncio.current_task())
        return time.perf_counter()

    def _end(self, counted: bool, method: str, code: str, start: float) -> None:
        if not counted:
            return
        self._tasks.discard(asyncio.current_task())
        self.num_running -= 1
        if self.num_running == 0:
            self._idle.set()
        if self._on_done is not None:
            self._on_done(method, code, time.perf_counter() - start)

    async def _admit(self, request, context, request_streaming: bool, counted: bool):
        """The request (iterator) for the handler, after refusing the call while draining
        or when its message does not parse."""
        if self.draining and counted:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "shutting down: this server takes no new requests; retry")
        if request_streaming:
            return _checked(request, context)
        if isinstance(request, _Unparseable):
            await _abort_unparseable(context, request)
        return request

    def _unary(self, behavior, method: str, request_streaming: bool, counted: bool):
        async def call(request, context):
            start, code = self._begin(counted), "UNKNOWN"
            try:
                request = await self._admit(request, context, request_streaming, counted)
                response = await behavior(request, context)
                code = _code_name(context.code())
                return response
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            except asyncio.CancelledError:
                code = "UNAVAILABLE" if self.cutting and counted else "CANCELLED"
                await self._cut(context, counted)
                raise
            finally:
                self._end(counted, method, code, start)
        return call

    def _streaming(self, behavior, method: str, request_streaming: bool, counted: bool):
        async def call(request, context):
            start, code = self._begin(counted), "UNKNOWN"
            try:
                request = await self._admit(request, context, request_streaming, counted)
                async for response in behavior(request, context):
                    yield response
                code = _code_name(context.code())
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            except asyncio.CancelledError:
                code = "UNAVAILABLE" if self.cutting and counted else "CANCELLED"
                await self._cut(context, counted)
                raise
            except GeneratorExit:
                code = "CANCELLED"
                raise
            finally:
                self._end(counted, method, code, start)
        return call

    def begin_call(self) -> float:
        """A call of another transport (the frontend's HTTP API) starts: it counts as
        running until end_call, so the drain waits for it. Returns its start time."""
        return self._begin(True, cuttable=False)

    def end_call(self, method: str, code: str, start: float) -> None:
        self._end(True, method, code, start)

    def cut_running(self) -> None:
        """Ends every running call with UNAVAILABLE (CUT_MESSAGE), so that a client learns
        why its call stopped rather than seeing the connection drop."""
        self.cutting = True
        for task in list(self._tasks):
            task.cancel()

    async def _cut(self, context, counted: bool) -> None:
        """After a CancelledError: if cut_running caused it, answer UNAVAILABLE."""
        if self.cutting and counted:
            await context.abort(grpc.StatusCode.UNAVAILABLE, CUT_MESSAGE)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call runs; False if some still run after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 with List too (grpcio-health-checking leaves it unimplemented, and
    its base servicer logs a traceback for every call)."""

    def __init__(self):
        super().__init__()
        self.statuses = {"": health_pb2.HealthCheckResponse.SERVING}
        """Service name -> status, as last set (the base class starts "" SERVING too)."""

    async def set(self, service: str, status) -> None:
        self.statuses[service] = status
        await super().set(service, status)

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self.statuses.items()})


class Lifecycle:
    """Health and drain of one server. `set_serving` reports whether the process can do its
    job; health says SERVING only while it can and is not draining."""

    def __init__(self, service_names: list[str], on_call_done=None):
        self.health = HealthServicer()
        self.service_names = ["", *service_names]
        self.calls = ServerCalls(on_call_done)
        self.able = False
        self._stop = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self.calls.draining

    async def set_serving(self, able: bool) -> None:
        self.able = able
        status = (health_pb2.HealthCheckResponse.SERVING if able and not self.draining
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.service_names:
            await self.health.set(name, status)

    def stop_on_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def drain(self, server: grpc.aio.Server, grace_s: float) -> None:
        """NOT_SERVING, refuse new calls, let running ones finish within `grace_s`, stop."""
        self.calls.draining = True
        await self.set_serving(False)
        num_running = self.calls.num_running
        log.info("draining: %d calls running, grace %.1f s", num_running, grace_s)
        if not await self.calls.wait_idle(grace_s):
            log.warning("grace period over: cutting %d calls", self.calls.num_running)
            self.calls.cut_running()
            await self.calls.wait_idle(STOP_GRACE_S)
        await server.stop(grace=STOP_GRACE_S)
