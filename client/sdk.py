"""The slora SDK: `Client` (sync) and `AsyncClient` (asyncio) over the public gRPC API.

    from slora.client import Client
    with Client("localhost:50051", api_key="slora_...") as c:
        for event in c.stream("Hello", adapter_id="acme", max_new_tokens=32):
            print(event.text, end="", flush=True)

Auth: every call carries `authorization: Bearer <api_key>` (default $SLORA_API_KEY). TLS:
`tls=True` trusts the system's CAs, `tls_ca=` a given bundle; `tls_cert=`/`tls_key=` add a
client certificate (mTLS). Each is PEM bytes or a file path.

Adapters: `adapter_id="acme"` names the caller's own; another tenant's shared or public one
is named "owner/acme" (its `ref`).

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
    RETRY_ATTEMPTS, Generation, TokenEvent, auth_metadata, backoff_s, channel_credentials,
    event_from_proto, generate_request, generation_from_proto, new_request_id, retryable,
    upload_chunks,
)
from slora.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc, keys_pb2, keys_pb2_grpc

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]


def _gen_kwargs(adapter_id=None, chat=False, max_new_tokens=16, temperature=0.0, top_k=0,
                top_p=1.0, seed=None, stop=(), stop_token_ids=(), ignore_eos=False,
                return_logprobs=False, request_id=None) -> dict:
    return dict(adapter_id=adapter_id, chat=chat, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                return_logprobs=return_logprobs, request_id=request_id or new_request_id())


def _register_request(adapter_id: str, path: str, request_id: str | None, public: bool,
                      shared_with) -> adapters_pb2.RegisterAdapterRequest:
    return adapters_pb2.RegisterAdapterRequest(
        adapter_id=adapter_id, path=path, request_id=request_id or new_request_id(),
        public=public, shared_with=list(shared_with))


def _channel(module, target: str, tls: bool, tls_ca, tls_cert, tls_key):
    credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
    if credentials is None:
        return module.insecure_channel(target, options=_CHANNEL_OPTIONS)
    return module.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)


class Client:
    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None,
                 tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 timeout_s: float | None = 600.0, retries: int = RETRY_ATTEMPTS,
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
                 **kwargs) -> Generation:
        """Runs a request to its end. kwargs: adapter_id, chat, max_new_tokens, temperature,
        top_k, top_p, seed, stop, stop_token_ids, ignore_eos, return_logprobs, request_id."""
        req = generate_request(prompt, **_gen_kwargs(**kwargs))
        return generation_from_proto(self._call(self._gen.Generate, req, timeout_s))

    def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
               **kwargs) -> Iterator[TokenEvent]:
        """Yields token events as they are produced (same kwargs as generate)."""
        req = generate_request(prompt, **_gen_kwargs(**kwargs))
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

    def register_adapter(self, adapter_id: str, path: str, request_id: str | None = None, *,
                         public: bool = False,
                         shared_with: Sequence[str] = ()) -> adapters_pb2.Adapter:
        """Registers a PEFT folder the servers can read (under their adapter roots), private
        to the caller's tenant unless `public` or `shared_with` named tenants."""
        req = _register_request(adapter_id, path, request_id, public, shared_with)
        return self._call(self._adapters.Register, req)

    def upload_adapter(self, adapter_id: str, folder: str, request_id: str | None = None, *,
                       public: bool = False,
                       shared_with: Sequence[str] = ()) -> adapters_pb2.Adapter:
        """Uploads a local PEFT folder in chunks and registers it."""
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
        self._call(self._adapters.Delete, adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id))

    # -- admin: API keys (needs an admin key) ------------------------------------------------

    def create_key(self, tenant: str, *, admin: bool = False,
                   description: str = "") -> keys_pb2.CreateKeyResponse:
        """A new API key for `tenant`; `.secret` is the key, shown this once."""
        return self._call(self._keys.Create, keys_pb2.CreateKeyRequest(
            tenant=tenant, admin=admin, description=description))

    def list_keys(self, tenant: str = "", include_revoked: bool = False) -> list[keys_pb2.ApiKey]:
        return list(self._call(self._keys.List, keys_pb2.ListKeysRequest(
            tenant=tenant, include_revoked=include_revoked)).keys)

    def revoke_key(self, key_id: str) -> keys_pb2.ApiKey:
        return self._call(self._keys.Revoke, keys_pb2.RevokeKeyRequest(key_id=key_id)).key


class AsyncClient:
    """The asyncio twin of Client (use inside a running event loop)."""

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None,
                 tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 timeout_s: float | None = 600.0, retries: int = RETRY_ATTEMPTS):
        self._channel = _channel(grpc.aio, target, tls, tls_ca, tls_cert, tls_key)
        self._metadata = auth_metadata(api_key)
        self._gen = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
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
                       **kwargs) -> Generation:
        req = generate_request(prompt, **_gen_kwargs(**kwargs))
        return generation_from_proto(await self._call(self._gen.Generate, req, timeout_s))

    async def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                     **kwargs) -> AsyncIterator[TokenEvent]:
        req = generate_request(prompt, **_gen_kwargs(**kwargs))
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

    async def register_adapter(self, adapter_id: str, path: str,
                               request_id: str | None = None, *, public: bool = False,
                               shared_with: Sequence[str] = ()) -> adapters_pb2.Adapter:
        req = _register_request(adapter_id, path, request_id, public, shared_with)
        return await self._call(self._adapters.Register, req)

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
