"""Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param",
"code"}}` with the HTTP status of the gRPC code the same failure gets on the gRPC API (one
mapping, below). A full queue's retry hint (the scheduler's `grpc-retry-pushback-ms`)
becomes `Retry-After` (whole seconds) and `retry-after-ms`, which the openai client reads
first."""
from __future__ import annotations

import json
import math

from aiohttp import web

from slora.common.errors import SloraError, UploadTooLargeError

PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
UNAVAILABLE_RETRY_AFTER_S = 1
"""What a 503 asks the client to wait: a restarted scheduler is found within a second."""

CODE_TO_STATUS = {
    "OK": (200, ""),
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
INTERNAL = (500, "internal_server_error")
STATUS_TO_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS",
                  413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}
"""For aiohttp's own refusals (unknown route, wrong method, body too large): the code
their call is counted under in the metrics."""


class ModelNotFoundError(SloraError):
    """A request's `model` is neither the base model nor an adapter the caller may use."""

    grpc_code = "NOT_FOUND"
    param = "model"


def status_of(err: SloraError) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an error."""
    if isinstance(err, UploadTooLargeError):
        return 413, "request_too_large"
    return CODE_TO_STATUS.get(err.grpc_code, INTERNAL)


def error_body(message: str, kind: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code.lower()}}


def retry_after_headers(err: SloraError) -> dict[str, str]:
    """Retry-After for a full queue (from the scheduler's hint; 1 s without one) and for a
    503."""
    if err.grpc_code == "UNAVAILABLE":
        return {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
    if err.grpc_code != "RESOURCE_EXHAUSTED" or isinstance(err, UploadTooLargeError):
        return {}
    pushback_ms = next((v for k, v in getattr(err, "trailers", ()) if k == PUSHBACK_TRAILER),
                       None)
    try:
        ms = max(int(pushback_ms), 1) if pushback_ms is not None else 1000
    except ValueError:
        ms = 1000
    return {"Retry-After": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}


def error_response(err: SloraError) -> web.Response:
    status, kind = status_of(err)
    body = error_body(str(err), kind, err.grpc_code, getattr(err, "param", None))
    return web.json_response(body, status=status, headers=retry_after_headers(err))


def http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusal (404 route, 405, 413 ...) in OpenAI's shape."""
    code = STATUS_TO_CODE.get(exc.status, "INVALID_ARGUMENT")
    message = exc.text if exc.text and exc.content_type == "text/plain" else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return web.json_response(error_body(message, exc.reason.lower().replace(" ", "_"), code),
                             status=exc.status, headers=headers)


def sse_error(err: SloraError) -> bytes:
    """An error after the stream began (its 200 is sent): one event with the error body, as
    the openai client expects."""
    status, kind = status_of(err)
    body = error_body(str(err), kind, err.grpc_code)
    body["error"]["status"] = status
    return b"data: " + json.dumps(body).encode() + b"\n\n"
