"""The scheduler process's step loop: drives the worker over a Steps stream and hands each
request's events to the Submit stream waiting for them.

Owner: scheduler/. The planner (planner.py) owns requests, pages and adapter residency, and
is called only from the event loop's thread. This module owns the wire to the worker and the
asyncio side: one event queue per live request, and the wake-up of the loop.

The overlap loop. The worker holds at most MAX_STEPS_IN_FLIGHT = 2 commands: step N, which
it is running, and step N+1, queued behind it. As soon as N is sent the loop plans N+1 (the
planner counts N's tokens as placeholders) and sends it; then it sleeps until result N
arrives, applies it (`update`, events out to the streams), and plans and sends N+2 while the
worker runs N+1. So the worker finds its next command waiting whenever it finishes a step,
and planning, protobuf and gRPC hide behind the step in flight. One asyncio.Event wakes the
loop for everything: a result (set by the reader task), a submission, a cancel. With nothing
to run the loop sleeps on it; there is no polling.

Failures. A request that fails alone (its sampling, its adapter's load) comes back in a
successful step result and ends with its own error event (planner.update); nothing else
changes. A whole step that fails (the worker dropped all its state, see worker/server.py)
sends every running request back to the queue and retries those of the failed step once
(a second failure ends one with UNAVAILABLE and a message about it alone); no adapter
counts as resident any more (`forget_worker_state`), and the loop opens a new Steps stream.
If the stream breaks (the worker is gone), every request ends with UNAVAILABLE at once,
submissions are refused with UNAVAILABLE, and the loop reconnects when a worker with the
same config answers again.
A worker that does not answer a step within max(hung_step_factor x the step's expected
time (deadlines.py's cost model), hung_step_floor_s) counts as lost the same way (it is
hung: SIGSTOP, a stuck kernel); whoever supervises it restarts it (client/launcher.py
probes the worker's health).

Deadlines and overload (see deadlines.py). The queue is bounded: past `max_queue_len` a
submission is refused with RESOURCE_EXHAUSTED and a retry hint. A submission whose estimated
finish is past its deadline is refused, and a waiting request that will miss its deadline is
dropped, both with DEADLINE_EXCEEDED (early abort). `pause` stops planning steps, so
submissions pile up in the queue: how tests make overload deterministic.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time

import grpc

from slora.common.config import EngineConfig
from slora.common.errors import InvalidRequestError, SloraError
from slora.common.grpc_options import DEFAULT_KEEPALIVE_S, internal_channel_options
from slora.common.internal_auth import call_metadata
from slora.protos.model_info import engine_config_from_model_info
from slora.protos.convert import sampling_from_proto, step_command_to_proto, step_result_from_proto
from slora.protos.step import StepCommand
from slora.scheduler import metrics
from slora.scheduler.adapter_residency import AdapterRef
from slora.scheduler.deadlines import FinishEstimator, StepTimer
from slora.scheduler.planner import Scheduler
from slora.scheduler.request import NO_DEADLINE, FinishReason, RequestOutput
from slora.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("slora.scheduler")

MAX_STEPS_IN_FLIGHT = 2
"""The step the worker runs and the one queued behind it."""
MAX_REQUEST_ID_LEN = 256
RECONNECT_DELAYS_S = (0.1, 0.25, 0.5, 1.0)
"""Waits between attempts to reach a lost worker; the last one repeats."""
DEFAULT_HUNG_STEP_FACTOR = 10.0
DEFAULT_HUNG_STEP_FLOOR_S = 20.0
"""A step past max(10x its expected time, 20 s) means a hung worker (SIGSTOP, a stuck
kernel): long enough for a first CUDA-graph capture inside a step."""
MAX_FAILED_STEPS_RETRIED = 1
"""A request in a failed step is recomputed once; in a second one, it ends UNAVAILABLE."""
WORKER_UP = ""
"""`StepDriver.worker_down_reason` while the worker is reachable."""

FINISH_REASON_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


class RequestIdInUseError(SloraError):
    grpc_code = "ALREADY_EXISTS"


class WorkerUnavailableError(SloraError):
    grpc_code = "UNAVAILABLE"


class EarlyAbortError(SloraError):
    """The request cannot finish before its deadline (deadlines.py's estimate)."""

    grpc_code = "DEADLINE_EXCEEDED"


class StreamEnd:
    """Put on a request's event queue instead of a last event: ends its Submit stream with
    this gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


class _WorkerLost(Exception):
    pass


class _StepFailed(Exception):
    def __init__(self, result: worker_pb2.StepResult, cmd: StepCommand):
        super().__init__(result.error)
        self.result, self.cmd = result, cmd


def event_from_output(out: RequestOutput) -> scheduler_pb2.RequestEvent:
    return scheduler_pb2.RequestEvent(
        token_ids=out.new_token_ids, logprobs=out.new_logprobs, finished=out.finished,
        finish_reason=FINISH_REASON_TO_PROTO[out.finish_reason],
        num_prompt_tokens=out.num_prompt_tokens, num_output_tokens=out.num_output_tokens,
        error=out.error)


def _has_work(cmd: StepCommand) -> bool:
    return bool(cmd.new_requests or cmd.running_requests or cmd.finished_req_ids
                or cmd.adapter_loads or cmd.adapter_evictions)


class StepDriver:
    def __init__(self, planner: Scheduler, worker_address: str, worker_config: EngineConfig,
                 on_worker_available=None, keepalive_s: float = DEFAULT_KEEPALIVE_S,
                 secret: str = "", hung_step_factor: float = DEFAULT_HUNG_STEP_FACTOR,
                 hung_step_floor_s: float = DEFAULT_HUNG_STEP_FLOOR_S):
        """A step that takes longer than max(`hung_step_factor` x its expected time,
        `hung_step_floor_s`) marks the worker hung: it is treated as lost."""
        self.hung_step_factor = hung_step_factor
        self.hung_step_floor_s = hung_step_floor_s
        self.planner = planner
        self.config = planner.config
        self.worker_address = worker_address
        self._worker_config = worker_config
        """The worker's own config (before the scheduler's limits): a reconnected worker
        must have the same."""
        # Keepalive pings find a worker whose host vanished (no TCP reset) within
        # keepalive_s + 5 s; worker/server.py permits them (common/grpc_options.py).
        self._channel = grpc.aio.insecure_channel(
            worker_address, options=internal_channel_options(keepalive_s))
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._metadata = call_metadata(secret)
        """The deployment's internal secret, which the worker requires on every call."""
        self._event_queues: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._requests_changed = asyncio.Event()
        """Set, then replaced by a fresh one, whenever requests finish or are cancelled."""
        self.worker_down_reason = WORKER_UP
        self._on_worker_available = on_worker_available or (lambda available: None)
        """Called with False when the worker is lost, True when it is back."""
        self.num_steps = 0
        self.paused = False
        self.timer = StepTimer()
        self.estimator = FinishEstimator(planner, self.timer)
        self._submitted_at: dict[str, float] = {}
        """Submission time of requests not yet admitted once, for the queue-wait metric."""
        self.max_adapter_pages = self.config.model.adapter_num_pages(
            {m: self.config.pool.max_lora_rank for m in self.config.model.lora_modules})

    # -- requests in and out (called by the servicer) --------------------------------------

    def submit(self, request: scheduler_pb2.SubmitRequest,
               deadline_s: float = NO_DEADLINE) -> asyncio.Queue:
        """Validates and queues the request; returns the queue its events arrive on. Raises
        a SloraError naming what is wrong. `deadline_s`: when the client stops waiting
        (time.monotonic())."""
        if self.worker_down_reason != WORKER_UP:
            raise WorkerUnavailableError(self.worker_down_reason)
        req_id = request.request_id
        if not req_id or len(req_id) > MAX_REQUEST_ID_LEN:
            raise InvalidRequestError(
                f"request_id must have 1 to {MAX_REQUEST_ID_LEN} characters, got {len(req_id)}")
        if req_id in self.planner.requests or req_id in self._event_queues:
            raise RequestIdInUseError(f"request_id {req_id!r} is already in use")
        sampling = sampling_from_proto(request.sampling)
        adapter = self._check_adapter(request.adapter) if request.HasField("adapter") else None
        now = time.monotonic()
        self._abort_hopeless(now)
        try:
            req = self.planner.submit(req_id, list(request.prompt_token_ids), sampling, adapter)
        except SloraError as e:
            metrics.REQUESTS.labels("queue_full" if e.grpc_code == "RESOURCE_EXHAUSTED"
                                    else "invalid").inc()
            raise
        req.deadline_s = deadline_s
        if deadline_s != NO_DEADLINE:
            needed_s = self.estimator.estimate_new(req, now)
            if now + needed_s > deadline_s:
                self.planner.cancel(req_id)
                self.estimator.forget()
                metrics.REQUESTS.labels("early_abort_submit").inc()
                raise EarlyAbortError(
                    f"early abort: request {req_id!r} needs about {needed_s:.2f} s "
                    f"({len(self.planner.waiting)} waiting, {len(self.planner.running)} "
                    f"running, {self.estimator.step_seconds() * 1000:.1f} ms a step); its "
                    f"deadline is in {deadline_s - now:.2f} s")
        self._submitted_at[req_id] = now
        queue = self._event_queues[req_id] = asyncio.Queue()
        self._wake.set()
        return queue

    def retry_pushback_ms(self) -> int:
        """How long a client refused for a full queue should wait (deadlines.py)."""
        return self.estimator.retry_pushback_ms()

    def pause(self, paused: bool) -> bool:
        """Stops (or resumes) planning steps; returns whether it was paused."""
        was, self.paused = self.paused, paused
        log.info("paused" if paused else "resumed")
        self._wake.set()
        return was

    def _abort_hopeless(self, now: float, force: bool = False) -> None:
        """Early abort: ends the waiting requests that the estimate says will miss their
        deadlines. Not while paused: nothing moves, the estimate means nothing."""
        hopeless = self.estimator.refresh(now, force)
        if self.paused:
            return
        for req in hopeless:
            metrics.REQUESTS.labels("early_abort_queue").inc()
            self._end_request(
                req.req_id, grpc.StatusCode.DEADLINE_EXCEEDED,
                f"early abort: request {req.req_id!r} would miss its deadline (in "
                f"{req.deadline_s - now:.2f} s) waiting behind {len(self.planner.running)} "
                f"running requests; dropped from the queue", outcome=None)

    def _check_adapter(self, msg: scheduler_pb2.AdapterRef) -> AdapterRef:
        ref = AdapterRef(msg.adapter_id, msg.path, msg.num_pages)
        if not ref.adapter_id or not ref.path:
            raise InvalidRequestError(
                f"adapter needs an adapter_id and a path, got {ref.adapter_id!r} and {ref.path!r}")
        if not 0 < ref.num_pages <= self.max_adapter_pages:
            raise InvalidRequestError(
                f"adapter {ref.adapter_id!r} has num_pages {ref.num_pages}; it must be in "
                f"[1, {self.max_adapter_pages}] (rank {self.config.pool.max_lora_rank} on all "
                "modules)")
        known = self._known_adapter(ref.adapter_id)
        if known is not None and known != ref:
            raise InvalidRequestError(
                f"adapter {ref.adapter_id!r} is in use from {known.path!r} ({known.num_pages} "
                f"pages); drop it (DropAdapter) before serving it from {ref.path!r} "
                f"({ref.num_pages} pages)")
        return ref

    def _known_adapter(self, adapter_id: str) -> AdapterRef | None:
        entry = self.planner.residency.resident.get(adapter_id)
        if entry is not None:
            return entry.ref
        return next((r.adapter for r in self.planner.requests.values()
                     if r.adapter_id == adapter_id), None)

    def release(self, req_id: str, queue: asyncio.Queue) -> None:
        """The Submit stream reading `queue` ended (finished, or the client went away):
        cancel its request if it is still live, freeing its pages now. (A finished or ended
        request's queue is no longer registered; its id may already serve another stream.)"""
        if self._event_queues.get(req_id) is queue:
            del self._event_queues[req_id]
            self._submitted_at.pop(req_id, None)
            if self.planner.cancel(req_id) is not None:
                metrics.REQUESTS.labels("cancelled").inc()
                log.info("request cancelled: its client went away",
                         extra={"request_id": req_id})
            self._on_requests_changed()

    def cancel(self, req_id: str) -> bool:
        out = self.planner.cancel(req_id)
        if out is None:
            return False
        self._deliver(out)
        self._on_requests_changed()
        return True

    async def drop_adapter(self, adapter_id: str) -> None:
        """Waits until no waiting or running request uses the adapter, then evicts it."""
        while not self.planner.drop_adapter(adapter_id):
            await self._requests_changed.wait()

    def stats(self) -> dict[str, int]:
        return dict(self.planner.stats(), num_steps=self.num_steps,
                    worker_available=int(self.worker_down_reason == WORKER_UP),
                    paused=int(self.paused),
                    step_time_us=round(self.timer.seconds_per_step * 1e6))

    def _deliver(self, out: RequestOutput) -> None:
        queue = self._event_queues.get(out.req_id)
        if queue is not None:
            queue.put_nowait(event_from_output(out))
            if out.finished:
                del self._event_queues[out.req_id]
        if out.finished:
            reason = out.finish_reason.value if out.finish_reason else "unknown"
            metrics.REQUESTS.labels(reason).inc()
            self._submitted_at.pop(out.req_id, None)
            log.info("request finished", extra={
                "request_id": out.req_id, "reason": reason, "error": out.error,
                "prompt_tokens": out.num_prompt_tokens,
                "output_tokens": out.num_output_tokens})

    def _end_request(self, req_id: str, code: grpc.StatusCode, message: str,
                     outcome: str | None = "") -> None:
        """Ends a request's stream with `code`; counts it under `outcome` (default: the
        code's name; None: already counted)."""
        self.planner.cancel(req_id)
        self._submitted_at.pop(req_id, None)
        queue = self._event_queues.pop(req_id, None)
        if queue is not None:
            queue.put_nowait(StreamEnd(code, message))
        if outcome is not None:
            metrics.REQUESTS.labels(outcome or code.name.lower()).inc()
        log.info("request ended", extra={"request_id": req_id, "code": code.name,
                                         "details": message})

    def _on_requests_changed(self) -> None:
        self._wake.set()  # freed pages may admit a waiting request
        self._requests_changed.set()
        self._requests_changed = asyncio.Event()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until cancelled: one Steps stream after another."""
        while True:
            call = self._stub.Steps(metadata=self._metadata)
            results: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(self._read_results(call, results))
            try:
                await self._drive(call, results)
            except _StepFailed as failed:
                self._recover_from_failed_step(failed)
            except _WorkerLost as e:
                self._fail_all(f"worker at {self.worker_address} is unavailable: {e}")
                await self._reconnect()
            finally:
                reader.cancel()
                call.cancel()

    async def _drive(self, call, results: asyncio.Queue) -> None:
        in_flight: collections.deque[tuple[StepCommand, float]] = collections.deque()
        """Commands sent and not answered yet, with when each was sent."""
        while True:
            self._wake.clear()
            while not results.empty():
                self._apply(results.get_nowait(), in_flight)
            if self.planner.waiting:
                self._abort_hopeless(time.monotonic())
            if len(in_flight) < MAX_STEPS_IN_FLIGHT and not self.paused:
                cmd = self.planner.schedule()
                if _has_work(cmd):
                    try:
                        await call.write(step_command_to_proto(cmd))
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        raise _WorkerLost(
                            f"{(await call.code()).name}: {await call.details()}") from None
                    now = time.monotonic()
                    in_flight.append((cmd, now))
                    self.num_steps += 1
                    for new in cmd.new_requests:
                        submitted_at = self._submitted_at.pop(new.req_id, None)
                        if submitted_at is not None:
                            metrics.QUEUE_WAIT.observe(now - submitted_at)
                    continue
            if not in_flight:
                await self._wake.wait()
                continue
            limit_s = self.hung_step_limit_s(in_flight[0][0])
            started_at = self.timer.started_at(in_flight[0][1])
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       max(started_at + limit_s - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                if results.empty():
                    self._raise_hung(in_flight[0][0], time.monotonic() - started_at, limit_s)

    def hung_step_limit_s(self, cmd: StepCommand) -> float:
        """How long the worker may take over `cmd` before it counts as hung."""
        return max(self.hung_step_factor * self.timer.expected_s(cmd), self.hung_step_floor_s)

    def _raise_hung(self, cmd: StepCommand, elapsed_s: float, limit_s: float) -> None:
        metrics.WORKER_HUNG.inc()
        raise _WorkerLost(
            f"it has not answered step {cmd.step_id} for {elapsed_s:.1f} s (expected about "
            f"{self.timer.expected_s(cmd):.3f} s, limit {limit_s:.1f} s): it is hung")

    async def _read_results(self, call, results: asyncio.Queue) -> None:
        try:
            while (msg := await call.read()) is not grpc.aio.EOF:
                results.put_nowait(msg)
                self._wake.set()
            results.put_nowait(_WorkerLost("it ended the Steps stream"))
        except grpc.aio.AioRpcError as e:
            results.put_nowait(_WorkerLost(f"{e.code().name}: {e.details()}"))
        self._wake.set()

    def _apply(self, item, in_flight: collections.deque[tuple[StepCommand, float]]) -> None:
        if isinstance(item, _WorkerLost):
            raise item
        cmd, sent_at = in_flight.popleft()
        assert item.step_id == cmd.step_id, f"result of step {item.step_id}, expected {cmd.step_id}"
        if item.error:
            raise _StepFailed(item, cmd)
        num_requests = len(cmd.new_requests) + len(cmd.running_requests)
        metrics.STEP_TIME.observe(self.timer.on_result(sent_at, time.monotonic(), cmd))
        if num_requests:
            metrics.STEP_BATCH_SIZE.observe(num_requests)
        outputs = self.planner.update(step_result_from_proto(item))
        for out in outputs:
            self._deliver(out)
        if any(out.finished for out in outputs):
            self._on_requests_changed()

    def _recover_from_failed_step(self, failed: _StepFailed) -> None:
        """A whole step failed on the worker (not one request's fault: those come back in
        a successful result), and the worker dropped all its state. Its requests are
        retried once, recomputed from their tokens with every other running request; one
        in a second failed step ends UNAVAILABLE. The worker's error text goes to the log
        only: it may quote any request of the batch, and each client gets its own words."""
        log.error("step %d failed on the worker: %s", failed.cmd.step_id, failed.result.error)
        # An adapter that did not load (found before the step ran, with a tensor-parallel
        # group) fails its own requests; the others did nothing wrong.
        for adapter_error in failed.result.adapter_errors:
            for out in self.planner.abort_adapter(adapter_error.adapter_id, adapter_error.error):
                self._deliver(out)
        for req_id in [r.req_id for r in failed.cmd.new_requests] + \
                      [r.req_id for r in failed.cmd.running_requests]:
            req = self.planner.requests.get(req_id)
            if req is None or failed.result.adapter_errors:
                continue
            req.num_failed_steps += 1
            if req.num_failed_steps > MAX_FAILED_STEPS_RETRIED:
                metrics.REQUESTS.labels("step_failed").inc()
                self._end_request(
                    req_id, grpc.StatusCode.UNAVAILABLE,
                    f"request {req_id!r} was in {req.num_failed_steps} steps that failed on "
                    f"the worker; it is not retried again", outcome=None)
        self.planner.forget_worker_state()
        self._on_requests_changed()

    def _fail_all(self, reason: str) -> None:
        log.error("%s; ending %d requests", reason, len(self.planner.requests))
        self.worker_down_reason = reason
        self._on_worker_available(False)
        for req_id in list(self.planner.requests):
            self._end_request(req_id, grpc.StatusCode.UNAVAILABLE, reason)
        self.planner.forget_worker_state()
        self._on_requests_changed()

    async def _reconnect(self) -> None:
        """Waits for a worker at the same address with the same config."""
        for attempt in itertools.count():
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            try:
                info = await self._stub.Info(scheduler_pb2.InfoRequest(), timeout=5.0,
                                             metadata=self._metadata)
            except grpc.aio.AioRpcError:
                continue
            try:
                config = engine_config_from_model_info(info)
            except SloraError as e:
                config, reason = None, str(e)
            if config == self._worker_config:
                log.info("worker at %s is back", self.worker_address)
                self.worker_down_reason = WORKER_UP
                self._on_worker_available(True)
                return
            if config is not None:
                reason = "it now serves another model or pool config; restart the scheduler"
            self.worker_down_reason = f"worker at {self.worker_address}: {reason}"
            log.error("%s", self.worker_down_reason)

    async def close(self) -> None:
        await self._channel.close()
