"""POST /v1/completions and /v1/chat/completions: the OpenAI body becomes the gRPC API's
GenerateRequest (schema.py) and runs through the same GenerationService.events as a gRPC
call, under the same tenant request slot.

Status before body: the first event is awaited before the response starts, so a request
refused at once (full queue, no replica, past its deadline, unknown model) gets its HTTP
status, never a 200 stream that fails. After that, an error arrives as one `data:` event
with the error body, then `data: [DONE]`.

A client that goes away cancels the handler (aiohttp's handler cancellation), which closes
the event stream and so cancels the Submit: the scheduler frees the pages within a step.
The caller's deadline is the `x-slora-timeout-s` header (seconds), carried to the scheduler
as a gRPC deadline is; past it the request ends with 504.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math

from aiohttp import web

from slora.common.errors import AdapterDeletingError, AdapterNotFoundError, SloraError
from slora.frontend.auth import principal
from slora.frontend.generation import UpstreamError
from slora.frontend.http.errors import ModelNotFoundError, sse_error
from slora.frontend.http.responses import Output
from slora.frontend.http.schema import ChatBody, CompletionBody, generate_request, invalid, parse
from slora.frontend.http.state import API, CODE, REQUEST_ID_HEADER

TIMEOUT_HEADER = "x-slora-timeout-s"
MAX_TIMEOUT_S = 86400.0
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def time_remaining_of(request: web.Request):
    """The caller's deadline as GenerationService.events takes it."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return lambda: None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise invalid(TIMEOUT_HEADER, f"{raw!r}: give seconds, more than 0 and at most "
                                      f"{MAX_TIMEOUT_S:g}")
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    return lambda: max(end - loop.time(), 0.0)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse(CompletionBody, await request.read()))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse(ChatBody, await request.read()))


async def _generate(request: web.Request, body) -> web.StreamResponse:
    api = request.app[API]
    chat = isinstance(body, ChatBody)
    time_remaining = time_remaining_of(request)
    base = api.info.model_name
    gen = generate_request(body, "" if body.model == base else body.model,
                           api.info.max_model_len, request.headers.get(REQUEST_ID_HEADER, ""))
    messages = body.chat_messages() if chat else None
    with api.limiter.slot(principal().tenant):
        events = api.generation.events(gen, time_remaining, messages)
        async with contextlib.aclosing(events):
            try:
                first = await anext(events)
            except AdapterDeletingError:
                raise
            except StopAsyncIteration:
                raise UpstreamError("UNAVAILABLE", "the scheduler ended the request without "
                                                   "an answer; retry") from None
            except AdapterNotFoundError:
                raise ModelNotFoundError(
                    f"model {body.model!r} does not exist: it is neither the base model "
                    f"{base!r} nor an adapter you may use (GET /v1/models lists them)") \
                    from None
            output = Output(chat, body.model, first.request_id, api.generation.tokenizer,
                            include_usage=body.include_usage,
                            token_ids_as_text=body.return_tokens_as_token_ids)
            headers = {REQUEST_ID_HEADER: first.request_id}
            if not body.stream:
                collected = [first] + [e async for e in events]
                return web.json_response(output.body(collected), headers=headers)
            return await _stream(request, output, first, events, headers)


async def _stream(request: web.Request, output: Output, first, events,
                  headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    await response.prepare(request)

    async def send(chunks: list[dict]) -> None:
        if chunks:
            await response.write(b"".join(b"data: " + json.dumps(c).encode() + b"\n\n"
                                          for c in chunks))

    try:
        await send(output.first_chunks() + output.chunks(first))
        try:
            async for event in events:
                await send(output.chunks(event))
        except SloraError as e:
            request[CODE] = e.grpc_code
            await response.write(sse_error(e))
        await response.write(DONE)
        await response.write_eof()
    except ConnectionResetError:
        request[CODE] = "CANCELLED"
    return response
