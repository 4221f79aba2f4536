"""gRPC status codes as typed exceptions of the SDK."""
from __future__ import annotations

import grpc


class SloraClientError(Exception):
    """A call failed; `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        super().__init__(f"{code.name}: {details}")


class InvalidArgumentError(SloraClientError): ...
class NotFoundError(SloraClientError): ...
class AlreadyExistsError(SloraClientError): ...
class FailedPreconditionError(SloraClientError): ...
class ResourceExhaustedError(SloraClientError): ...
class UnavailableError(SloraClientError): ...
class DeadlineExceededError(SloraClientError): ...
class UnauthenticatedError(SloraClientError): ...
class PermissionDeniedError(SloraClientError): ...
class CancelledError(SloraClientError): ...


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


def from_rpc_error(e: grpc.RpcError) -> SloraClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return _BY_CODE.get(code, SloraClientError)(code, details or "")
