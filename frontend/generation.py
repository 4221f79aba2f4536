"""The public Generation service: validate, tokenize, look the adapter up, forward to the
scheduler, and stream text deltas back. Holds no state a restart would lose: each call
lives only as long as its stream.

What is left of the client's deadline goes with the Submit to the scheduler, which uses it
for early abort; when it passes, gRPC cancels both calls and the scheduler frees the
request's pages. A client that goes away cancels the Submit the same way. The scheduler's
status reaches the client unchanged (with its `grpc-retry-pushback-ms` trailer), except that
a Submit cancelled under us (the scheduler stopping) becomes UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator

import grpc

from slora.common.errors import InvalidRequestError, SloraError, bounded
from slora.common.logs import request_id_var
from slora.frontend import metrics
from slora.frontend.auth import KeyRecheck, principal
from slora.frontend.adapter_records import StaleIfErrorCache
from slora.frontend.replica_set import NoReplicaError
from slora.frontend.stop_strings import (
    MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, StopStringMatcher,
)
from slora.frontend.tokenizer import IncrementalDetokenizer
from slora.protos.convert import sampling_from_proto
from slora.scheduler.admission import check_prompt
from slora.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2

log = logging.getLogger("slora.frontend")

MAX_REQUEST_ID_CHARS = 128
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
"""A text prompt's largest UTF-8 size, checked before it is tokenized (--max-prompt-bytes)."""
TOKENIZER_THREADS = 2
"""Prompts tokenized at once, off the event loop (HF tokenizers release the GIL)."""
PASSED_TRAILERS = ("grpc-retry-pushback-ms",)
"""Trailing metadata of the scheduler's answer that the client gets too."""


async def _events(first, call):
    """The first event (None: the stream ended without one), then the rest of the call."""
    if first is None:
        return
    yield first
    async for event in call:
        yield event


async def abort_with(context: grpc.aio.ServicerContext, err: SloraError) -> None:
    await context.abort(getattr(grpc.StatusCode, err.grpc_code), bounded(str(err)))


class UpstreamError(SloraError):
    """A request's end that is not a refusal of ours: the scheduler's status (with the
    trailers the caller may see, PASSED_TRAILERS), the worker's error (FAILED_PRECONDITION)
    or a key revoked while it ran (UNAUTHENTICATED)."""

    def __init__(self, grpc_code: str, details: str, trailers: tuple = ()):
        super().__init__(bounded(details))
        self.grpc_code = grpc_code
        self.trailers = trailers


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, replicas, registry, tokenizer, model_info,
                 max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES):
        self.replicas = replicas
        """The schedulers to route to (replica_set.ReplicaSet)."""
        self.registry = registry
        self.tokenizer = tokenizer
        self.info = model_info
        self.max_prompt_bytes = max_prompt_bytes
        self.adapter_records = StaleIfErrorCache()
        self._tokenizer_threads = concurrent.futures.ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="slora-tokenize")

    async def _tokenize(self, text: str | list[dict], chat: bool) -> list[int]:
        """On a tokenizer thread: the event loop goes on serving every other call (and
        health checks) while a long prompt is tokenized. `text`: a chat's messages too."""
        encode = self.tokenizer.apply_chat_template if chat else self.tokenizer.encode
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_threads, encode, text)

    def _check_prompt_bytes(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.max_prompt_bytes:
            raise InvalidRequestError(
                f"{what} {num_bytes} bytes; this server takes at most "
                f"{self.max_prompt_bytes} (--max-prompt-bytes)")

    # -- validation -----------------------------------------------------------------------

    async def _prepare(self, request: generation_pb2.GenerateRequest,
                       messages: list[dict] | None = None):
        """GenerateRequest (or its sampling and adapter with `messages`, a chat) ->
        SubmitRequest; raises SloraError naming what is wrong."""
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError(
                f"request_id has {len(request.request_id)} characters; at most "
                f"{MAX_REQUEST_ID_CHARS}")
        sampling = sampling_from_proto(request.sampling)
        stops = list(request.sampling.stop)
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise InvalidRequestError(
                f"stop: at most {MAX_STOP_STRINGS} strings of {MAX_STOP_STRING_CHARS} "
                "characters")
        which = request.WhichOneof("input")
        if messages is not None:
            self._check_prompt_bytes(
                sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages),
                "messages have")
            prompt_ids = await self._tokenize(messages, chat=True)
        elif which == "prompt_token_ids":
            if request.chat:
                raise InvalidRequestError("chat applies to a text prompt, not token ids")
            prompt_ids = list(request.prompt_token_ids.ids)
        elif which == "prompt":
            text = request.prompt
            self._check_prompt_bytes(len(text.encode("utf-8", "surrogatepass")), "prompt has")
            prompt_ids = await self._tokenize(text, request.chat) if text else []
        else:
            prompt_ids = []
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty: give a prompt or prompt_token_ids")
        check_prompt(prompt_ids, sampling, self.info.max_model_len, self.info.vocab_size)
        submit = scheduler_pb2.SubmitRequest(
            request_id=f"{request.request_id or 'req'}-{uuid.uuid4().hex[:12]}",
            prompt_token_ids=prompt_ids, sampling=request.sampling)
        submit.sampling.max_new_tokens = sampling.max_new_tokens
        submit.sampling.top_p = sampling.top_p
        if request.adapter_id:
            tenant = principal().tenant
            record = await self.adapter_records.get(
                (tenant, request.adapter_id),
                lambda: self.registry.lookup(request.adapter_id, tenant))
            submit.adapter.CopyFrom(scheduler_pb2.AdapterRef(
                adapter_id=record.qualified_id, path=record.path, num_pages=record.num_pages))
        return submit, prompt_ids, stops

    # -- the calls ------------------------------------------------------------------------

    async def events(self, request: generation_pb2.GenerateRequest, time_remaining,
                     messages: list[dict] | None = None
                     ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        """The request's events, for both APIs (gRPC here, HTTP in frontend/http/): text
        deltas, the last one with finish reason, usage and timings. `time_remaining()` is
        what is left of the caller's deadline in seconds (None: no deadline); `messages`,
        a chat in place of `request.prompt`. Raises SloraError before the first event (bad
        request, unknown adapter) and UpstreamError after.

        Close it (contextlib.aclosing) when the caller goes away: that cancels the Submit
        at once, and the scheduler frees the request's pages."""
        arrival = time.perf_counter()
        submit, prompt_ids, stops = await self._prepare(request, messages)
        request_id_var.set(submit.request_id)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        matcher = StopStringMatcher(stops)
        recheck = KeyRecheck()
        first_token_at = None
        num_output = 0
        outcome = "CANCELLED"
        """The status code this call ends with, for its log line."""
        call = None
        try:
            try:
                call, first, ticket = await self.replicas.submit(submit, time_remaining)
            except NoReplicaError as e:
                outcome = "UNAVAILABLE"
                raise UpstreamError(outcome, str(e)) from None
            async for event in _events(first, call):
                if first_token_at is None and event.token_ids:
                    first_token_at = time.perf_counter()
                    metrics.TIME_TO_FIRST_TOKEN.observe(first_token_at - arrival)
                num_output = event.num_output_tokens
                text = matcher.add(detok.add(list(event.token_ids)))
                finish = event.finish_reason
                if event.finished:
                    text += matcher.add(detok.flush()) + matcher.flush()
                if matcher.stopped and not event.finished:
                    call.cancel()
                    finish = common_pb2.FINISH_REASON_STOP
                out = generation_pb2.GenerateEvent(
                    text=text, token_ids=event.token_ids,
                    logprobs=event.logprobs if request.return_logprobs else [],
                    request_id=submit.request_id)
                done = event.finished or matcher.stopped
                if done:
                    now = time.perf_counter()
                    out.finish_reason = finish
                    out.usage.CopyFrom(generation_pb2.Usage(
                        prompt_tokens=len(prompt_ids), completion_tokens=num_output))
                    out.timings.CopyFrom(generation_pb2.Timings(
                        time_to_first_token_s=(first_token_at or now) - arrival,
                        total_s=now - arrival))
                if event.error:
                    outcome = "FAILED_PRECONDITION"
                    raise UpstreamError(outcome, event.error)
                if not done and (revoked := await recheck.revoked()):
                    outcome = "UNAUTHENTICATED"
                    raise UpstreamError(outcome, revoked)
                if done:
                    outcome = "OK"
                yield out
                if done:
                    return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and matcher.stopped:
                outcome = "OK"
                return
            code = e.code()
            if code == grpc.StatusCode.CANCELLED:
                code = grpc.StatusCode.UNAVAILABLE
            outcome = code.name
            trailers = tuple((k, v) for k, v in (e.trailing_metadata() or ())
                             if k in PASSED_TRAILERS)
            raise UpstreamError(code.name, e.details() or "scheduler unavailable",
                                trailers) from None
        finally:
            if call is not None:
                call.cancel()
                self.replicas.done(ticket)
            self._finished(submit, request, outcome, arrival, first_token_at,
                           len(prompt_ids), num_output, ticket if call is not None else None)

    async def GenerateStream(self, request, context):
        try:
            async with contextlib.aclosing(
                    self.events(request, context.time_remaining)) as events:
                async for event in events:
                    yield event
        except SloraError as e:
            if isinstance(e, UpstreamError) and e.trailers:
                context.set_trailing_metadata(e.trailers)
            await abort_with(context, e)

    @staticmethod
    def _finished(submit, request, outcome: str, arrival: float, first_token_at,
                  num_prompt: int, num_output: int, replica_id: str | None = None) -> None:
        """The call's log line (with the replica that served it) and latency metrics."""
        now = time.perf_counter()
        if outcome == "OK":
            metrics.OUTPUT_TOKENS.inc(num_output)
            if first_token_at is not None and num_output >= 2:
                metrics.TIME_PER_OUTPUT_TOKEN.observe(
                    (now - first_token_at) / (num_output - 1))
        log.info("request finished", extra={
            "request_id": submit.request_id, "client_request_id": request.request_id,
            "adapter_id": request.adapter_id, "replica": replica_id,
            "code": outcome, "prompt_tokens": num_prompt,
            "output_tokens": num_output, "total_s": round(now - arrival, 6),
            "time_to_first_token_s": None if first_token_at is None
            else round(first_token_at - arrival, 6)})

    async def Generate(self, request, context):
        response = generation_pb2.GenerateResponse()
        async for event in self.GenerateStream(request, context):
            response.text += event.text
            response.token_ids.extend(event.token_ids)
            response.logprobs.extend(event.logprobs)
            if event.finish_reason:
                response.finish_reason = event.finish_reason
                response.usage.CopyFrom(event.usage)
                response.timings.CopyFrom(event.timings)
                response.request_id = event.request_id
        return response
