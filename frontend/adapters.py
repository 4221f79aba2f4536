"""The public Adapters service: registration (by path or chunked upload), lookup, delete.
Metadata lives in Redis (adapter_store.registry), files in the store's folder.

Every call acts for the calling tenant (frontend/auth.py): registrations belong to it (within
its adapter quota), look-ups see what it may see (adapter_store/tenancy.py), and only the
owner deletes. Paths are read only inside the adapter roots (adapter_store/intake.py)."""
from __future__ import annotations

import grpc

from slora.adapter_store.intake import AdapterRoots
from slora.adapter_store.peft import base_model_warning
from slora.adapter_store.registry import PRIVATE, AdapterRecord, Sharing
from slora.adapter_store.uploads import UploadWriter
from slora.common.errors import InvalidRequestError, PermissionDeniedError, SloraError
from slora.frontend.auth import principal
from slora.frontend.generation import UpstreamError, abort_with
from slora.v1 import adapters_pb2, adapters_pb2_grpc, scheduler_pb2

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""List's largest page (a larger page_size gets this many), about 170 KB."""


def record_to_proto(r: AdapterRecord, viewer: str,
                    served_model: str | None = None) -> adapters_pb2.Adapter:
    """The record as `viewer` (a tenant) sees it: whom it is shared with is the owner's
    business only. `served_model`: the served model's name, to warn about a base_model that
    is not it."""
    warning = base_model_warning(r.adapter_id, r.base_model, served_model)
    return adapters_pb2.Adapter(
        adapter_id=r.adapter_id, owner=r.owner, rank=r.rank, lora_alpha=r.lora_alpha,
        target_modules=list(r.target_modules), base_model=r.base_model or "",
        sha256=r.sha256, size_bytes=r.size_bytes, created_unix=r.created_unix,
        num_pages=r.num_pages, use_rslora=r.use_rslora, public=r.public,
        shared_with=list(r.shared_with) if viewer == r.owner else [], ref=r.qualified_id,
        warnings=[warning] if warning else [])


class AdaptersService(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, registry, replicas, store_dir: str, max_upload_bytes: int,
                 roots: AdapterRoots | None = None, max_adapters_per_tenant: int = 0):
        self.registry = registry
        self.replicas = replicas
        self.store_dir = store_dir
        self.max_upload_bytes = max_upload_bytes
        self.roots = roots if roots is not None else AdapterRoots((), store_dir)
        self.max_adapters = max_adapters_per_tenant

    async def register_path(self, adapter_id: str, path: str, *, request_id: str = "",
                            sharing: Sharing = PRIVATE) -> AdapterRecord:
        """Registers the PEFT folder at `path` as the caller's (both APIs); raises
        SloraError."""
        if not path:
            raise InvalidRequestError("path is empty: give a PEFT folder the servers can read")
        return await self.registry.register_path(
            adapter_id, path, owner=principal().tenant, request_id=request_id,
            sharing=sharing, roots=self.roots, max_bytes=self.max_upload_bytes,
            max_adapters=self.max_adapters)

    async def Register(self, request, context):
        try:
            record = await self.register_path(
                request.adapter_id, request.path, request_id=request.request_id,
                sharing=Sharing(request.public, tuple(request.shared_with)))
        except SloraError as e:
            await abort_with(context, e)
        return record_to_proto(record, principal().tenant, self.registry.base_model_name)

    async def Upload(self, request_iterator, context):
        tenant = principal().tenant
        writer = None
        try:
            header = None
            async for chunk in request_iterator:
                part = chunk.WhichOneof("part")
                if part == "header":
                    if header is not None:
                        raise InvalidRequestError("upload: a second header")
                    header = chunk.header
                    writer = UploadWriter(self.store_dir, self.max_upload_bytes)
                elif part == "chunk":
                    if writer is None:
                        raise InvalidRequestError("upload: the first message must be the header")
                    writer.write(chunk.chunk.file_name, chunk.chunk.data)
            if writer is None:
                raise InvalidRequestError("upload: no header was sent")
            tmp_dir = writer.finish()
            writer = None
            record = await self.registry.register_dir_upload(
                header.adapter_id, tmp_dir, owner=tenant, request_id=header.request_id,
                sharing=Sharing(header.public, tuple(header.shared_with)),
                max_adapters=self.max_adapters)
        except SloraError as e:
            await abort_with(context, e)
        finally:
            if writer is not None:
                writer.abort()
        return record_to_proto(record, tenant, self.registry.base_model_name)

    async def Get(self, request, context):
        tenant = principal().tenant
        try:
            return record_to_proto(await self.registry.lookup(request.adapter_id, tenant),
                                   tenant, self.registry.base_model_name)
        except SloraError as e:
            await abort_with(context, e)

    async def List(self, request, context):
        """One page, in order of qualified id; the token is the last id of the page before."""
        tenant = principal().tenant
        try:
            if request.page_size < 0:
                raise InvalidRequestError(f"page_size is {request.page_size}; it must be 0 "
                                          f"(the default, {DEFAULT_PAGE_SIZE}) or more")
            page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            records, next_token = await self.registry.list_visible_page(
                tenant, page_size, request.page_token)
        except SloraError as e:
            await abort_with(context, e)
        return adapters_pb2.ListAdaptersResponse(
            adapters=[record_to_proto(r, tenant, self.registry.base_model_name)
                      for r in records], next_page_token=next_token)

    async def delete(self, ref: str) -> None:
        """Deletes the caller's adapter `ref` (both APIs): new requests for it are refused at
        once; this returns when the scheduler has no request left that uses it. Raises
        SloraError."""
        tenant = principal().tenant
        record = await self.registry.lookup(ref, tenant, include_deleting=True)
        if record.owner != tenant:
            raise PermissionDeniedError(
                f"adapter {ref!r} belongs to tenant {record.owner!r}; only its owner may "
                "delete it")
        adapter_id = record.qualified_id
        await self.registry.mark_deleting(adapter_id)
        try:
            await self.replicas.drop_adapter(adapter_id)
            await self.registry.delete(adapter_id)
        except (SloraError, grpc.aio.AioRpcError) as e:
            await self.registry.cancel_delete(adapter_id)
            if isinstance(e, SloraError):
                raise
            raise UpstreamError("UNAVAILABLE",
                                f"scheduler unavailable while deleting: {e.details()}") from None

    async def Delete(self, request, context):
        try:
            await self.delete(request.adapter_id)
        except SloraError as e:
            await abort_with(context, e)
        return adapters_pb2.DeleteAdapterResponse()
