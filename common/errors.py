"""Errors that reach users. Each names the offending value and the limit; the services
map each class to one gRPC status code (see `grpc_code`)."""
from __future__ import annotations


class SloraError(Exception):
    """Base of the errors a user can cause. `grpc_code` is a grpc.StatusCode name."""

    grpc_code = "INTERNAL"


class ConfigError(SloraError, ValueError):
    grpc_code = "INVALID_ARGUMENT"


class InvalidRequestError(SloraError, ValueError):
    """A request the engine refuses: empty or too long prompt, bad sampling parameters."""

    grpc_code = "INVALID_ARGUMENT"


class AdapterError(SloraError, ValueError):
    """An adapter that cannot be served: names the adapter, the file and what is wrong."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, adapter_id: str, file: str | None, reason: str):
        self.adapter_id, self.file, self.reason = adapter_id, file, reason
        where = f" ({file})" if file else ""
        super().__init__(f"adapter {adapter_id!r}{where}: {reason}")


class AdapterNotFoundError(SloraError, KeyError):
    grpc_code = "NOT_FOUND"

    def __init__(self, adapter_id: str):
        self.adapter_id = adapter_id
        super().__init__(f"adapter {adapter_id!r} is not registered")

    def __str__(self) -> str:
        return self.args[0]


class AdapterDeletingError(AdapterNotFoundError):
    """The adapter is being deleted (it waits for requests still using it): new requests
    for it are refused as if it were gone."""

    def __init__(self, adapter_id: str):
        self.adapter_id = adapter_id
        KeyError.__init__(self, f"adapter {adapter_id!r} is being deleted")


class AdapterBaseModelMismatch(AdapterError):
    grpc_code = "FAILED_PRECONDITION"


class AdapterExistsError(AdapterError):
    """The adapter id is taken: by other content or another owner, or by an adapter being
    deleted. A retry of the call that registered it (same request id) is not refused."""

    grpc_code = "ALREADY_EXISTS"


class RegistryUnavailableError(SloraError):
    """The adapter registry (Redis) cannot be reached or did not confirm a write; retrying
    with the same request id is safe."""

    grpc_code = "UNAVAILABLE"


class QueueFullError(SloraError):
    grpc_code = "RESOURCE_EXHAUSTED"


class UploadTooLargeError(InvalidRequestError):
    """An adapter upload (or a folder registered by path) larger than the server's limit."""

    grpc_code = "RESOURCE_EXHAUSTED"


class PathNotAllowedError(SloraError):
    """A path registration that would read outside the configured adapter roots (after
    resolving `..` and symlinks), or inside the adapter store itself."""

    grpc_code = "PERMISSION_DENIED"


class QuotaExceededError(SloraError):
    """A tenant is at one of its limits (registered adapters, concurrent requests)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class AuthenticationError(SloraError):
    """A missing, malformed, unknown or revoked API key."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(SloraError):
    """A valid key asking for what its tenant may not do (an admin call, another tenant's
    adapter it can see but not change)."""

    grpc_code = "PERMISSION_DENIED"


class KeyNotFoundError(SloraError):
    grpc_code = "NOT_FOUND"


class LastAdminKeyError(SloraError):
    """Revoking the only active admin key would leave nobody able to manage keys."""

    grpc_code = "FAILED_PRECONDITION"


MAX_DETAILS_CHARS = 1024
"""Longest error message a server sends. Messages repeat the client's input (a path, an id)
to name what is wrong; gRPC carries them in a trailer, and a client refuses trailers over
8 KiB ("received metadata size exceeds"), which would turn the right status into
RESOURCE_EXHAUSTED."""


def bounded(details: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """`details` as it is, or cut in the middle with an ellipsis to `limit` characters (the
    start names the value, the end usually the limit)."""
    if len(details) <= limit:
        return details
    marker = "…({} characters cut)…"
    room = limit - len(marker.format(len(details)))
    head, tail = details[:room * 3 // 4], details[len(details) - room // 4:]
    return head + marker.format(len(details) - len(head) - len(tail)) + tail


class TensorParallelGroupError(SloraError):
    """A rank of the tensor-parallel worker group died, hung past the collective timeout or
    lost its peers: the group is down and must be restarted as a whole."""

    grpc_code = "UNAVAILABLE"
