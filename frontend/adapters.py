"""The public Adapters service: registration (by path or chunked upload), lookup, delete.
Metadata lives in Redis (adapter_store.registry), files in the store's folder."""
from __future__ import annotations

import grpc

from slora.adapter_store.registry import AdapterRecord
from slora.adapter_store.uploads import UploadWriter
from slora.common.errors import InvalidRequestError, SloraError
from slora.frontend.generation import abort_with
from slora.v1 import adapters_pb2, adapters_pb2_grpc, scheduler_pb2


def record_to_proto(r: AdapterRecord) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(
        adapter_id=r.adapter_id, owner=r.owner, rank=r.rank, lora_alpha=r.lora_alpha,
        target_modules=list(r.target_modules), base_model=r.base_model or "",
        sha256=r.sha256, size_bytes=r.size_bytes, created_unix=r.created_unix,
        num_pages=r.num_pages, use_rslora=r.use_rslora)


class AdaptersService(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, registry, scheduler_stub, store_dir: str, max_upload_bytes: int):
        self.registry = registry
        self.scheduler = scheduler_stub
        self.store_dir = store_dir
        self.max_upload_bytes = max_upload_bytes

    async def Register(self, request, context):
        try:
            if not request.path:
                raise InvalidRequestError("path is empty: give a PEFT folder the servers can read")
            record = await self.registry.register_path(
                request.adapter_id, request.path, request_id=request.request_id)
        except SloraError as e:
            await abort_with(context, e)
        return record_to_proto(record)

    async def Upload(self, request_iterator, context):
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
            record = await self.registry.register_dir_upload(
                header.adapter_id, tmp_dir, request_id=header.request_id)
            writer = None
        except SloraError as e:
            await abort_with(context, e)
        finally:
            if writer is not None:
                writer.abort()
        return record_to_proto(record)

    async def Get(self, request, context):
        try:
            return record_to_proto(await self.registry.get(request.adapter_id))
        except SloraError as e:
            await abort_with(context, e)

    async def List(self, request, context):
        try:
            records = await self.registry.list()
        except SloraError as e:
            await abort_with(context, e)
        return adapters_pb2.ListAdaptersResponse(adapters=[record_to_proto(r) for r in records])

    async def Delete(self, request, context):
        """New requests for the adapter are refused at once; the delete completes when the
        scheduler has no request left that uses it."""
        try:
            await self.registry.mark_deleting(request.adapter_id)
        except SloraError as e:
            await abort_with(context, e)
        try:
            await self.scheduler.DropAdapter(
                scheduler_pb2.DropAdapterRequest(adapter_id=request.adapter_id))
            await self.registry.delete(request.adapter_id)
        except (SloraError, grpc.aio.AioRpcError) as e:
            await self.registry.cancel_delete(request.adapter_id)
            if isinstance(e, SloraError):
                await abort_with(context, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"scheduler unavailable while deleting: {e.details()}")
        return adapters_pb2.DeleteAdapterResponse()
