"""Who may call the internal services: the processes of one deployment, which prove it with
a shared secret.

The scheduler's and the worker's gRPC ports answer only calls that carry the deployment's
internal secret as metadata `slora-internal-secret` (health checks stay open, for probes).
The server compares it in constant time (hmac.compare_digest) and answers UNAUTHENTICATED
before any handler runs, so a stranger on the host cannot submit work with a server path of
its choosing, pause the scheduler, or open a Steps stream that would replace the
scheduler's. The frontend and the scheduler send it on every internal call.

The secret is 32 random bytes (43 URL-safe characters), in env SLORA_INTERNAL_SECRET or in
the file of `--internal-secret-file`: made by whichever process starts first if the file
does not exist (mode 0600, created atomically, so processes starting together agree), and
refused if others may read it. `slora up` keeps it in <data-dir>/internal.secret; compose in
the shared volume.
"""
from __future__ import annotations

import argparse
import hmac
import os
import secrets
import stat

import grpc

from slora.common.errors import ConfigError, bounded

SECRET_ENV = "SLORA_INTERNAL_SECRET"
SECRET_FILE_ENV = "SLORA_INTERNAL_SECRET_FILE"
METADATA_KEY = "slora-internal-secret"
SECRET_FILE_NAME = "internal.secret"
"""Its name in a data dir (`slora up`, compose)."""
MIN_SECRET_CHARS = 32
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
"""Callable without the secret."""


def add_internal_secret_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--internal-secret-file", default=os.environ.get(SECRET_FILE_ENV),
        help="file with the deployment's internal secret, which internal calls carry; made "
             f"(mode 0600) if it does not exist (env {SECRET_ENV} holds the secret itself "
             f"and wins; env {SECRET_FILE_ENV} is this flag's default)")


def internal_secret(args: argparse.Namespace) -> str:
    """The secret from env SLORA_INTERNAL_SECRET or `--internal-secret-file`; ConfigError
    without either."""
    given = os.environ.get(SECRET_ENV)
    if given:
        return _checked(given, SECRET_ENV)
    if not args.internal_secret_file:
        raise ConfigError(
            f"the internal services need the deployment's secret: pass "
            f"--internal-secret-file PATH (made at first start) or set {SECRET_ENV}")
    return load_or_create_secret(args.internal_secret_file)


def _checked(secret: str, source: str) -> str:
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"the internal secret from {source} has {len(secret)} characters; "
                          f"it needs at least {MIN_SECRET_CHARS}")
    return secret


def load_or_create_secret(path: str, num_bytes: int = 32) -> str:
    """The secret in `path`, made first if the file does not exist: written to a private
    temporary file, then hard-linked into place (a second process starting at the same time
    finds the link taken and reads the winner's). ConfigError if others may read the file."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(num_bytes) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: use that one
        finally:
            os.unlink(tmp)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode:04o}): run "
                          f"`chmod 600 {path}`")
    with open(path) as f:
        return _checked(f.read(), path)


def call_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call to an internal service."""
    return ((METADATA_KEY, secret),)


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str):
    """A handler of the same shape as `handler` that only aborts with `code`."""
    details = bounded(details)

    async def refuse(request, context):
        await context.abort(code, details)

    async def refuse_stream(request, context):
        await context.abort(code, details)
        yield  # unreachable: makes this an async generator, as a streaming handler is

    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
        ("stream" if handler.response_streaming else "unary")
    behavior = refuse_stream if handler.response_streaming else refuse
    return getattr(grpc, f"{kind}_rpc_method_handler")(
        behavior, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class InternalAuth(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks that lacks the secret: UNAUTHENTICATED, the
    handler never runs. Put it first in a server's interceptors."""

    def __init__(self, secret: str, service: str):
        self._secret = secret.encode()
        self._service = service

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        given = next((v for k, v in details.invocation_metadata or () if k == METADATA_KEY),
                     None)
        if isinstance(given, str):
            given = given.encode("utf-8", "replace")
        if given is not None and hmac.compare_digest(given, self._secret):
            return handler
        why = "without" if given is None else "with a wrong"
        return refusing_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED,
            f"{details.method} refused: a call to the {self._service}'s internal port "
            f"{why} deployment secret (metadata '{METADATA_KEY}')")


class _WithSecret:
    def __init__(self, secret: str):
        self._metadata = call_metadata(secret)

    def _with_secret(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(m) for m in details.metadata or ()),
                                     *self._metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


class _UnaryUnaryWithSecret(_WithSecret, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_secret(details), request)


class _UnaryStreamWithSecret(_WithSecret, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_secret(details), request)


def send_secret(secret: str) -> list:
    """A grpc.aio channel's interceptors adding the secret to every call with one request
    message (the frontend's channel to its scheduler: Submit, DropAdapter, Info, health).
    grpc.aio files an interceptor under its first kind only, hence one object per kind."""
    return [_UnaryUnaryWithSecret(secret), _UnaryStreamWithSecret(secret)]
