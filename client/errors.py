"""gRPC status codes as typed exceptions of the SDK."""
from __future__ import annotations

import grpc

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
NO_RETRY_HINT = None


UNAUTHENTICATED_HINT = (
    "give an API key: api_key= (the CLI's --api-key), $SLORA_API_KEY, or the admin key file "
    "that `slora up` writes, $SLORA_DATA_DIR/admin.key (default ~/.slora/admin.key)")
SHUTTING_DOWN = "shutting down"
"""In the message of an UNAVAILABLE that a server sends while it stops."""


class SloraClientError(Exception):
    """A call failed; `code` is the gRPC status code, `details` the server's message, and
    `retry_after_s` the server's hint of when to try again (a full queue's
    RESOURCE_EXHAUSTED carries one), or None. str() adds what to do, where the code says."""

    hint = ""

    def __init__(self, code: grpc.StatusCode, details: str,
                 retry_after_s: float | None = NO_RETRY_HINT):
        self.code, self.details, self.retry_after_s = code, details, retry_after_s
        super().__init__(f"{code.name}: {details}" + (f" ({self.hint})" if self.hint else ""))


class InvalidArgumentError(SloraClientError): ...
class NotFoundError(SloraClientError): ...
class AlreadyExistsError(SloraClientError): ...
class FailedPreconditionError(SloraClientError): ...
class ResourceExhaustedError(SloraClientError): ...
class DeadlineExceededError(SloraClientError): ...
class PermissionDeniedError(SloraClientError): ...
class CancelledError(SloraClientError): ...


class UnauthenticatedError(SloraClientError):
    hint = UNAUTHENTICATED_HINT


class UnavailableError(SloraClientError):
    @property
    def shutting_down(self) -> bool:
        """The server said it is stopping (a drain, `slora up` on Ctrl-C), rather than
        being unreachable."""
        return SHUTTING_DOWN in self.details


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def retry_hint_s(e: grpc.RpcError) -> float | None:
    """The `grpc-retry-pushback-ms` trailer of a failed call, in seconds, or None."""
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(int(value), 0) / 1000
            except ValueError:
                return NO_RETRY_HINT
    return NO_RETRY_HINT


def from_rpc_error(e: grpc.RpcError) -> SloraClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return _BY_CODE.get(code, SloraClientError)(code, details or "", retry_hint_s(e))
