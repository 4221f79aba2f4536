"""The slora SDK: `Client` (sync) and `AsyncClient` (asyncio) over the public gRPC API, with
the same methods (messages.OPERATIONS), arguments and defaults.

    from slora.client import Client
    with Client() as c:                    # localhost:50051, or $SLORA_ADDRESS
        for event in c.stream("Hello", adapter_id="acme", max_new_tokens=32):
            print(event.text, end="", flush=True)

Auth: every call carries `authorization: Bearer <key>`, the key being `api_key=`, else
$SLORA_API_KEY, else the admin key `slora up` keeps in $SLORA_DATA_DIR/admin.key (default
~/.slora/admin.key), as the CLI finds it. TLS: `tls=True` trusts the system's CAs, `tls_ca=`
a given bundle; `tls_cert=`/`tls_key=` add a client certificate (mTLS). Each is PEM bytes or
a file path.

Adapters: `adapter_id="acme"` names the caller's own; another tenant's shared or public one
is named "owner/acme" (its `ref`). Registering the same folder under the same id again
returns the registered adapter (a re-run script succeeds); other content under a taken id is
AlreadyExistsError.

Retries: only UNAVAILABLE, a bounded number of times with jittered backoff; a stream is
retried only if it failed before delivering a token; registrations carry a request id so
a retried call registers once.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterator, Sequence

import grpc

from slora.client.errors import from_rpc_error
from slora.client.messages import (
    GENERATE_DEFAULTS, OPERATIONS, RETRY_ATTEMPTS, Generation, TokenEvent, auth_metadata, backoff_s,
    channel_credentials, default_address, event_from_proto, generate_request,
    generation_from_proto, new_request_id, retryable, check_upload_folder, upload_chunks,
)
from slora.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc, keys_pb2, keys_pb2_grpc

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]
DEFAULT_TIMEOUT_S = 600.0
"""Deadline of one call, seconds (a whole stream counts as one call)."""


def _generate(prompt, options: dict):
    unknown = set(options) - set(GENERATE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; generate and stream take "
                        f"{', '.join(GENERATE_DEFAULTS)}")
    kwargs = {**GENERATE_DEFAULTS, **options}
    kwargs["request_id"] = kwargs["request_id"] or new_request_id()
    return generate_request(prompt, **kwargs)


_GENERATE_DOC = (
    "Runs a request to its end and returns its Generation. `prompt`: text or token ids. "
    "Options (keyword only), with their defaults: " +
    ", ".join(f"{k}={v!r}" for k, v in GENERATE_DEFAULTS.items()) +
    "; `timeout_s` overrides the client's deadline for this call.")
_STREAM_DOC = "Yields TokenEvents as tokens are produced; same arguments as generate."


def _register_request(adapter_id: str, path: str, request_id: str | None, public: bool,
                      shared_with) -> adapters_pb2.RegisterAdapterRequest:
    return adapters_pb2.RegisterAdapterRequest(
        adapter_id=adapter_id, path=path, request_id=request_id or new_request_id(),
        public=public, shared_with=list(shared_with))


def _channel(module, target: str | None, tls: bool, tls_ca, tls_cert, tls_key):
    target = target or default_address()
    credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
    if credentials is None:
        return module.insecure_channel(target, options=_CHANNEL_OPTIONS)
    return module.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)


class Client:
    """`target`: the frontend's host:port (None: $SLORA_ADDRESS, else localhost:50051);
    `api_key`: None finds one as the CLI does (module docstring); `timeout_s`: each call's
    deadline; `retries`: attempts after an UNAVAILABLE."""

    def __init__(self, target: str | None = None, *, api_key: str | None = None,
                 tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, retries: int = RETRY_ATTEMPTS,
                 channel: grpc.Channel | None = None):
        self._channel = channel or _channel(grpc, target, tls, tls_ca, tls_cert, tls_key)
        self._metadata = auth_metadata(api_key)
        self._gen = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._keys = keys_pb2_grpc.KeysStub(self._channel)
        self.timeout_s, self.retries = timeout_s, retries

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn, request, timeout_s: float | None = None):
        for attempt in range(self.retries + 1):
            try:
                return fn(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                if not retryable(e) or attempt == self.retries:
                    raise from_rpc_error(e) from None
                time.sleep(backoff_s(attempt))

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                 **options) -> Generation:
        req = _generate(prompt, options)
        return generation_from_proto(self._call(self._gen.Generate, req, timeout_s))

    generate.__doc__ = _GENERATE_DOC

    def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
               **options) -> Iterator[TokenEvent]:
        req = _generate(prompt, options)
        for attempt in range(self.retries + 1):
            delivered = False
            call = self._gen.GenerateStream(req, timeout=timeout_s or self.timeout_s,
                                            metadata=self._metadata)
            try:
                for event in call:
                    delivered = True
                    yield event_from_proto(event)
                return
            except grpc.RpcError as e:
                if delivered or not retryable(e) or attempt == self.retries:
                    raise from_rpc_error(e) from None
                time.sleep(backoff_s(attempt))
            finally:
                call.cancel()

    stream.__doc__ = _STREAM_DOC

    def register_adapter(self, adapter_id: str, path: str, request_id: str | None = None, *,
                         public: bool = False,
                         shared_with: Sequence[str] = ()) -> adapters_pb2.Adapter:
        """Registers a PEFT folder the servers can read (under their adapter roots), private
        to the caller's tenant unless `public` or `shared_with` named tenants. The same
        content under the same id again returns the registered adapter."""
        req = _register_request(adapter_id, path, request_id, public, shared_with)
        return self._call(self._adapters.Register, req)

    def upload_adapter(self, adapter_id: str, folder: str, request_id: str | None = None, *,
                       public: bool = False,
                       shared_with: Sequence[str] = ()) -> adapters_pb2.Adapter:
        """Uploads a local PEFT folder in chunks and registers it (as register_adapter)."""
        check_upload_folder(folder)
        request_id = request_id or new_request_id()
        for attempt in range(self.retries + 1):
            try:
                return self._adapters.Upload(
                    upload_chunks(adapter_id, folder, request_id, public, shared_with),
                    timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                if not retryable(e) or attempt == self.retries:
                    raise from_rpc_error(e) from None
                time.sleep(backoff_s(attempt))

    def get_adapter(self, adapter_id: str) -> adapters_pb2.Adapter:
        """The adapter `adapter_id` names (own id, or "owner/id")."""
        return self._call(self._adapters.Get, adapters_pb2.GetAdapterRequest(adapter_id=adapter_id))

    def list_adapters(self, page_size: int = 0) -> list[adapters_pb2.Adapter]:
        """Every adapter the caller may use, one page per call (`page_size` 0: the server's
        default)."""
        out, token = [], None
        while token != "":
            resp = self._call(self._adapters.List, adapters_pb2.ListAdaptersRequest(
                page_size=page_size, page_token=token or ""))
            out += resp.adapters
            token = resp.next_page_token
        return out

    def delete_adapter(self, adapter_id: str) -> None:
        """Deletes one of the caller's adapters, once no request uses it."""
        self._call(self._adapters.Delete, adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id))

    # -- admin: API keys (needs an admin key) ------------------------------------------------

    def create_key(self, tenant: str, *, admin: bool = False,
                   description: str = "") -> keys_pb2.CreateKeyResponse:
        """A new API key for `tenant`; `.secret` is the key, shown this once."""
        return self._call(self._keys.Create, keys_pb2.CreateKeyRequest(
            tenant=tenant, admin=admin, description=description))

    def list_keys(self, tenant: str = "", include_revoked: bool = False) -> list[keys_pb2.ApiKey]:
        """Keys (of `tenant`, or all), never their secrets."""
        return list(self._call(self._keys.List, keys_pb2.ListKeysRequest(
            tenant=tenant, include_revoked=include_revoked)).keys)

    def revoke_key(self, key_id: str) -> keys_pb2.ApiKey:
        """Revokes a key by its id; calls with it are UNAUTHENTICATED from then on."""
        return self._call(self._keys.Revoke, keys_pb2.RevokeKeyRequest(key_id=key_id)).key


class AsyncClient:
    """The asyncio twin of Client: the same methods, arguments and defaults, awaited (use
    inside a running event loop)."""

    def __init__(self, target: str | None = None, *, api_key: str | None = None,
                 tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, retries: int = RETRY_ATTEMPTS,
                 channel: grpc.aio.Channel | None = None):
        self._channel = channel or _channel(grpc.aio, target, tls, tls_ca, tls_cert, tls_key)
        self._metadata = auth_metadata(api_key)
        self._gen = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._keys = keys_pb2_grpc.KeysStub(self._channel)
        self.timeout_s, self.retries = timeout_s, retries

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, fn, request, timeout_s: float | None = None):
        for attempt in range(self.retries + 1):
            try:
                return await fn(request, timeout=timeout_s or self.timeout_s,
                                metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                if not retryable(e) or attempt == self.retries:
                    raise from_rpc_error(e) from None
                await asyncio.sleep(backoff_s(attempt))

    async def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                       **options) -> Generation:
        req = _generate(prompt, options)
        return generation_from_proto(await self._call(self._gen.Generate, req, timeout_s))

    generate.__doc__ = _GENERATE_DOC

    async def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                     **options) -> AsyncIterator[TokenEvent]:
        req = _generate(prompt, options)
        for attempt in range(self.retries + 1):
            delivered = False
            call = self._gen.GenerateStream(req, timeout=timeout_s or self.timeout_s,
                                            metadata=self._metadata)
            try:
                async for event in call:
                    delivered = True
                    yield event_from_proto(event)
                return
            except grpc.aio.AioRpcError as e:
                if delivered or not retryable(e) or attempt == self.retries:
                    raise from_rpc_error(e) from None
                await asyncio.sleep(backoff_s(attempt))
            finally:
                call.cancel()

    stream.__doc__ = _STREAM_DOC

    async def register_adapter(self, adapter_id: str, path: str,
                               request_id: str | None = None, *, public: bool = False,
                               shared_with: Sequence[str] = ()) -> adapters_pb2.Adapter:
        req = _register_request(adapter_id, path, request_id, public, shared_with)
        return await self._call(self._adapters.Register, req)

    async def upload_adapter(self, adapter_id: str, folder: str,
                             request_id: str | None = None, *, public: bool = False,
                             shared_with: Sequence[str] = ()) -> adapters_pb2.Adapter:
        request_id = request_id or new_request_id()
        for attempt in range(self.retries + 1):
            try:
                # The chunks are read from disk in the loop's thread: 1 MiB reads, brief.
                return await self._adapters.Upload(
                    upload_chunks(adapter_id, folder, request_id, public, shared_with),
                    timeout=self.timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                if not retryable(e) or attempt == self.retries:
                    raise from_rpc_error(e) from None
                await asyncio.sleep(backoff_s(attempt))

    async def get_adapter(self, adapter_id: str) -> adapters_pb2.Adapter:
        return await self._call(self._adapters.Get,
                                adapters_pb2.GetAdapterRequest(adapter_id=adapter_id))

    async def list_adapters(self, page_size: int = 0) -> list[adapters_pb2.Adapter]:
        out, token = [], None
        while token != "":
            resp = await self._call(self._adapters.List, adapters_pb2.ListAdaptersRequest(
                page_size=page_size, page_token=token or ""))
            out += resp.adapters
            token = resp.next_page_token
        return out

    async def delete_adapter(self, adapter_id: str) -> None:
        await self._call(self._adapters.Delete,
                         adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id))

    async def create_key(self, tenant: str, *, admin: bool = False,
                         description: str = "") -> keys_pb2.CreateKeyResponse:
        return await self._call(self._keys.Create, keys_pb2.CreateKeyRequest(
            tenant=tenant, admin=admin, description=description))

    async def list_keys(self, tenant: str = "",
                        include_revoked: bool = False) -> list[keys_pb2.ApiKey]:
        resp = await self._call(self._keys.List, keys_pb2.ListKeysRequest(
            tenant=tenant, include_revoked=include_revoked))
        return list(resp.keys)

    async def revoke_key(self, key_id: str) -> keys_pb2.ApiKey:
        resp = await self._call(self._keys.Revoke, keys_pb2.RevokeKeyRequest(key_id=key_id))
        return resp.key


for _name in OPERATIONS:
    _method = getattr(AsyncClient, _name)
    _method.__doc__ = _method.__doc__ or getattr(Client, _name).__doc__
