"""Who is calling: API keys checked on every public call, and per-tenant request limits.

AuthInterceptor runs before every handler of the public port. It reads
`authorization: Bearer <key>`, verifies the key (adapter_store/keys.py) and then:
missing, malformed, unknown or revoked key -> UNAUTHENTICATED; a Keys (admin) call with a
non-admin key -> PERMISSION_DENIED; Redis unable to say -> UNAVAILABLE. Health checking and
reflection stay open (load balancers and grpcurl call them without keys). A refused call's
handler never runs: the interceptor answers with a handler of the same shape that aborts.

An accepted call runs its handler with the caller's Principal in the `current_principal`
context variable; handlers read it with `principal()`, which fails closed (INTERNAL) if the
interceptor did not run. Generation calls also take one of the tenant's concurrent-request
slots for as long as they run; past the limit they get RESOURCE_EXHAUSTED at once. The count
is per frontend process (N frontends allow a tenant N times the limit): exact, free of
Redis round trips, and gone with the process, so a crash never leaks a slot.

Revocation reaches calls already running: a generation re-verifies its key between tokens
at most every REVOCATION_CHECK_S (KeyRecheck), and a revoked key's stream ends with
UNAUTHENTICATED at its next token after that.

With auth off (`--no-auth`) every caller is ANONYMOUS: tenant NO_TENANT, admin.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass

import grpc

from slora.adapter_store.keys import KeyStore
from slora.adapter_store.tenancy import NO_TENANT
from slora.common.errors import AuthenticationError, QuotaExceededError, RegistryUnavailableError
from slora.common.internal_auth import refusing_handler

log = logging.getLogger("slora.frontend")

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
"""Method prefixes callable without a key."""
ADMIN_SERVICES = ("/slora.v1.Keys/",)
LIMITED_METHODS = ("/slora.v1.Generation/Generate", "/slora.v1.Generation/GenerateStream")
"""Calls that hold one of the tenant's concurrent-request slots while they run."""
AUTH_HEADER = "authorization"
BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool
    key_id: str
    """"" when auth is off."""


ANONYMOUS = Principal(tenant=NO_TENANT, admin=True, key_id="")
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
REVOCATION_CHECK_S = 1.0
"""A running generation re-reads its key at most this often, between tokens."""
_current_key_check: contextvars.ContextVar = contextvars.ContextVar("key_check", default=None)
"""An async callable giving why the caller's key is no longer valid ("" while it is)."""


class KeyRecheck:
    """Revocation reaches running streams: `revoked()`, called between a stream's tokens,
    re-verifies the caller's key once REVOCATION_CHECK_S has passed since the last check and
    says why it is no longer valid ("" while it is, with auth off, and while Redis cannot
    say: a verified key outlives an outage)."""

    def __init__(self):
        self._check = _current_key_check.get()
        self._checked_at = time.monotonic()

    async def revoked(self) -> str:
        if self._check is None or time.monotonic() - self._checked_at < REVOCATION_CHECK_S:
            return ""
        self._checked_at = time.monotonic()
        return await self._check()


@contextlib.contextmanager
def acting_as(who: Principal, key_check=None):
    """`who` and its key check (AuthInterceptor.key_check) set for the block: how the HTTP
    API runs a request as its caller (a gRPC call sets them in its own task, in _as)."""
    tokens = current_principal.set(who), _current_key_check.set(key_check)
    try:
        yield
    finally:
        _current_key_check.reset(tokens[1])
        current_principal.reset(tokens[0])


def principal() -> Principal:
    """The caller of the running handler (set by AuthInterceptor)."""
    try:
        return current_principal.get()
    except LookupError:
        raise RuntimeError("no principal: the call did not pass AuthInterceptor") from None


class TenantLimiter:
    """Concurrent-request slots per tenant, in this process."""

    def __init__(self, max_per_tenant: int):
        self.max_per_tenant = max_per_tenant
        """0: no limit."""
        self.num_running: dict[str, int] = {}

    def try_acquire(self, tenant: str) -> bool:
        n = self.num_running.get(tenant, 0)
        if self.max_per_tenant and n >= self.max_per_tenant:
            return False
        self.num_running[tenant] = n + 1
        return True

    def busy_message(self, tenant: str) -> str:
        return (f"tenant {tenant!r} has {self.max_per_tenant} requests running, its limit; "
                "retry when one has finished")

    @contextlib.contextmanager
    def slot(self, tenant: str):
        """One of `tenant`'s slots while the block runs; QuotaExceededError when none is
        free."""
        if not self.try_acquire(tenant):
            raise QuotaExceededError(self.busy_message(tenant))
        try:
            yield
        finally:
            self.release(tenant)

    def release(self, tenant: str) -> None:
        n = self.num_running[tenant] - 1
        if n:
            self.num_running[tenant] = n
        else:
            del self.num_running[tenant]


def bearer_key(metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_HEADER:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            return value[len(BEARER):].strip() if value.lower().startswith(BEARER) else ""
    return None


def _as(handler: grpc.RpcMethodHandler, who: Principal, limiter: TenantLimiter | None,
        key_check=None):
    """`handler` run as `who`, holding a request slot of its tenant if `limiter`;
    `key_check` is what KeyRecheck calls."""
    # The context variable is set inside the behavior, which runs in the call's own task, and
    # never reset: the task (and its context) ends with the call.
    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def behavior(request, context):
            current_principal.set(who)
            _current_key_check.set(key_check)
            if limiter is not None and not limiter.try_acquire(who.tenant):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    limiter.busy_message(who.tenant))
            try:
                async for response in inner(request, context):
                    yield response
            finally:
                if limiter is not None:
                    limiter.release(who.tenant)
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def behavior(request, context):
            current_principal.set(who)
            _current_key_check.set(key_check)
            if limiter is not None and not limiter.try_acquire(who.tenant):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    limiter.busy_message(who.tenant))
            try:
                return await inner(request, context)
            finally:
                if limiter is not None:
                    limiter.release(who.tenant)

    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
        ("stream" if handler.response_streaming else "unary")
    return getattr(grpc, f"{kind}_rpc_method_handler")(
        behavior, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`keys` None: auth is off, every caller is ANONYMOUS."""

    def __init__(self, keys: KeyStore | None, limiter: TenantLimiter):
        self.keys = keys
        self.limiter = limiter

    async def identify(self, metadata) -> Principal:
        """The caller of a call with `metadata` ((key, value) pairs; the HTTP API passes its
        Authorization header the same way). Raises AuthenticationError, or
        RegistryUnavailableError when Redis cannot say."""
        if self.keys is None:
            return ANONYMOUS
        key = bearer_key(metadata)
        if key is None:
            raise AuthenticationError(
                f"missing API key: send metadata '{AUTH_HEADER}: Bearer <key>'")
        record = await self.keys.verify(key)
        return Principal(tenant=record.tenant, admin=record.admin, key_id=record.key_id)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        try:
            who = await self.identify(handler_call_details.invocation_metadata)
        except (AuthenticationError, RegistryUnavailableError) as e:
            log.info("refused %s: %s", method, e)
            return refusing_handler(handler, getattr(grpc.StatusCode, e.grpc_code), str(e))
        except Exception:  # a bug of ours: never let it through as an authenticated call
            log.exception("checking the API key of a %s call failed", method)
            return refusing_handler(handler, grpc.StatusCode.INTERNAL, "checking the API key failed")
        if method.startswith(ADMIN_SERVICES) and not who.admin:
            return refusing_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                             f"{method} needs an admin key; this key belongs to tenant "
                             f"{who.tenant!r}")
        return _as(handler, who, self.limiter if method in LIMITED_METHODS else None,
                   self.key_check(handler_call_details.invocation_metadata, who))

    def key_check(self, metadata, who: Principal):
        """What KeyRecheck calls for a call of `who` with `metadata` (None with auth off)."""
        if self.keys is None:
            return None
        key = bearer_key(metadata)

        async def check() -> str:
            try:
                await self.keys.verify(key)
            except AuthenticationError as e:
                return f"the API key of this call is no longer valid ({e})"
            except RegistryUnavailableError:
                pass
            return ""
        return check
