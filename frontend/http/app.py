"""The HTTP server of the OpenAI API: aiohttp's web server in the frontend's own event loop
(uvloop, beside grpc.aio), on its own port (--http-port), over TLS when the gRPC port is.

Two middlewares wrap every call but GET /health (open, like gRPC health):
- `calls`: while draining, new calls get 503; each call counts as running for the drain
  and is reported to the same metrics as a gRPC call (method `HTTP /v1/...`, the gRPC code
  its status stands for); SloraError and aiohttp's own refusals become OpenAI-shaped
  errors, and anything else a logged 500, so a handler's bug never drops the connection;
- `authenticate`: the Authorization header through AuthInterceptor.identify, the gRPC
  API's own check; the caller's Principal and key re-check (a revoked key ends a running
  stream) are set for the handler as on gRPC.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import ssl

from aiohttp import web

from slora.common.errors import AuthenticationError, ConfigError, SloraError
from slora.frontend.auth import AUTH_HEADER, acting_as
from slora.frontend.generation import UpstreamError
from slora.frontend.http import completions, models
from slora.frontend.http.errors import STATUS_TO_CODE, error_response, http_error_response
from slora.frontend.http.state import API, CODE, HttpApi

log = logging.getLogger("slora.frontend")

HTTP_OFF = -1
MIN_BODY_BYTES = 8 << 20
JSON_BYTES_PER_PROMPT_BYTE = 6
"""A prompt's byte in a JSON body, at worst (a \\u escape): a body may be that many times
--max-prompt-bytes, and at least MIN_BODY_BYTES."""
OPEN_PATHS = ("/health",)
SHUTDOWN_TIMEOUT_S = 1.0
"""What the server gives connections still open once the drain is over."""


def add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=0,
                   help="port of the OpenAI-compatible HTTP API (0: any free port, printed as "
                        f"http_port=N on the SLORA_READY line; {HTTP_OFF}: off)")


def _method(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return f"HTTP {resource.canonical}" if resource is not None else "HTTP unmatched"


@web.middleware
async def calls(request: web.Request, handler):
    if request.path in OPEN_PATHS:
        return await handler(request)
    api = request.app[API]
    start, code = api.lifecycle.calls.begin_call(), "UNKNOWN"
    try:
        if api.lifecycle.draining:
            response = error_response(UpstreamError(
                "UNAVAILABLE", "shutting down: this server takes no new requests; retry"))
        else:
            response = await _answer(request, handler)
        code = request.get(CODE) or ("OK" if response.status < 400 else
                                     STATUS_TO_CODE.get(response.status, "INTERNAL"))
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        code = "CANCELLED"
        raise
    finally:
        api.lifecycle.calls.end_call(_method(request), code, start)


async def _answer(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SloraError as e:
        request[CODE] = e.grpc_code
        return error_response(e)
    except web.HTTPException as e:
        return http_error_response(e)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        request[CODE] = "INTERNAL"
        return error_response(SloraError("internal error: the frontend's log has the details"))


@web.middleware
async def authenticate(request: web.Request, handler):
    if request.path in OPEN_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization")
    metadata = [] if header is None else [(AUTH_HEADER, header)]
    auth = request.app[API].auth
    try:
        who = await auth.identify(metadata)
    except AuthenticationError as e:
        log.info("refused HTTP %s: %s", request.path, e)
        raise
    # aiohttp runs each request in its own task; the caller is reset after it all the same.
    with acting_as(who, auth.key_check(metadata, who)):
        return await handler(request)


async def health(request: web.Request) -> web.Response:
    lifecycle = request.app[API].lifecycle
    serving = lifecycle.able and not lifecycle.draining
    return web.json_response({"status": "SERVING" if serving else "NOT_SERVING"},
                             status=200 if serving else 503)


def build_app(api: HttpApi) -> web.Application:
    max_body_bytes = max(MIN_BODY_BYTES,
                         JSON_BYTES_PER_PROMPT_BYTE * api.generation.max_prompt_bytes)
    app = web.Application(middlewares=[calls, authenticate], client_max_size=max_body_bytes)
    app[API] = api
    app.add_routes([
        web.post("/v1/completions", completions.completions),
        web.post("/v1/chat/completions", completions.chat_completions),
        web.get("/v1/models", models.list_models),
        web.get("/v1/models/{model:.+}", models.get_model),
        web.post("/v1/load_lora_adapter", models.load_lora_adapter),
        web.post("/v1/unload_lora_adapter", models.unload_lora_adapter),
        web.get("/health", health),
    ])
    return app


def ssl_context(args) -> ssl.SSLContext | None:
    """The gRPC port's TLS settings (--tls-cert/--tls-key, --tls-client-ca for mTLS)."""
    if not args.tls_cert:
        return None
    if not args.tls_key:
        raise ConfigError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_client_ca:
        context.load_verify_locations(args.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(args, api: HttpApi) -> tuple[web.AppRunner | None, int]:
    """Serves the API on --host:--http-port; returns (its runner, the bound port), or
    (None, HTTP_OFF)."""
    if args.http_port == HTTP_OFF:
        return None, HTTP_OFF
    runner = web.AppRunner(build_app(api), handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.http_port, ssl_context=ssl_context(args))
    try:
        await site.start()  # aiohttp leaves SO_REUSEPORT off: a port in use fails here
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(f"frontend: cannot listen on {args.host}:{args.http_port} (HTTP "
                          f"API): {e.strerror} (another slora stack, or another program?)") \
            from None
    return runner, runner.addresses[0][1]
