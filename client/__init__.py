"""The slora client SDK (sync and asyncio) and the `slora` command line."""
from slora.client.errors import (
    AlreadyExistsError, DeadlineExceededError, FailedPreconditionError, InvalidArgumentError,
    NotFoundError, PermissionDeniedError, ResourceExhaustedError, SloraClientError,
    UnauthenticatedError, UnavailableError,
)
from slora.client.messages import Generation, TokenEvent
from slora.client.sdk import AsyncClient, Client

__all__ = [
    "AlreadyExistsError", "AsyncClient", "Client", "DeadlineExceededError",
    "FailedPreconditionError", "Generation", "InvalidArgumentError", "NotFoundError",
    "PermissionDeniedError", "ResourceExhaustedError", "SloraClientError", "TokenEvent",
    "UnauthenticatedError", "UnavailableError",
]
