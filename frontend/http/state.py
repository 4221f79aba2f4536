"""What the HTTP API's handlers share: the frontend's own services, the same objects the
gRPC servers use (so both APIs run one copy of validation, auth, tenancy and limits)."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from slora.common.lifecycle import Lifecycle
from slora.frontend.adapters import AdaptersService
from slora.frontend.auth import AuthInterceptor, TenantLimiter
from slora.frontend.generation import GenerationService

REQUEST_ID_HEADER = "x-request-id"
"""In: the client's request id (as GenerateRequest.request_id); out: the server's."""


@dataclass
class HttpApi:
    generation: GenerationService
    adapters: AdaptersService
    auth: AuthInterceptor
    lifecycle: Lifecycle
    info: object
    """The scheduler's ModelInfo."""

    @property
    def limiter(self) -> TenantLimiter:
        return self.auth.limiter


API = web.AppKey("api", HttpApi)
CODE = web.RequestKey("code", str)
"""The gRPC status code a call ended with when its HTTP status does not say it (an error in
a stream that had begun), for the metrics."""
