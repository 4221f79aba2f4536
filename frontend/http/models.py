"""GET /v1/models (and /v1/models/{model}): the base model and the adapters the caller may
use, each named as a request's `model` names it (the caller's own by id, another tenant's
as `owner/id`). POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM serves
them (`lora_name`, `lora_path`; a plain-text "Success: ..." answer): registration by path
and delete, through the same AdaptersService calls as the gRPC API, so a path is read only
inside the adapter roots, the adapter belongs to the caller and only its owner unloads it.
"""
from __future__ import annotations

from aiohttp import web

from slora.adapter_store.registry import AdapterRecord, Sharing
from slora.common.errors import AdapterNotFoundError
from slora.frontend.auth import principal
from slora.frontend.http.errors import ModelNotFoundError
from slora.frontend.http.schema import Strict, parse
from slora.frontend.http.state import API, REQUEST_ID_HEADER

OWNED_BY_BASE = "slora"


class LoadBody(Strict):
    lora_name: str
    lora_path: str
    public: bool = False
    shared_with: list[str] = []


class UnloadBody(Strict):
    lora_name: str
    lora_int_id: int | None = None
    """vLLM's; accepted and unused."""


def base_card(info) -> dict:
    return {"id": info.model_name, "object": "model", "created": 0,
            "owned_by": OWNED_BY_BASE, "root": info.model_name, "parent": None,
            "max_model_len": info.max_model_len}


def adapter_card(record: AdapterRecord, tenant: str, info) -> dict:
    name = record.adapter_id if record.owner == tenant else record.qualified_id
    return {"id": name, "object": "model", "created": int(record.created_unix),
            "owned_by": record.owner or OWNED_BY_BASE, "root": name,
            "parent": info.model_name, "max_model_len": info.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    api = request.app[API]
    tenant = principal().tenant
    records = await api.adapters.registry.list_visible(tenant)
    return web.json_response({"object": "list", "data": [base_card(api.info)] + [
        adapter_card(r, tenant, api.info) for r in records]})


async def get_model(request: web.Request) -> web.Response:
    api = request.app[API]
    name = request.match_info["model"]
    if name == api.info.model_name:
        return web.json_response(base_card(api.info))
    tenant = principal().tenant
    try:
        record = await api.adapters.registry.lookup(name, tenant)
    except AdapterNotFoundError:
        raise ModelNotFoundError(f"model {name!r} does not exist or is not yours to use") \
            from None
    return web.json_response(adapter_card(record, tenant, api.info))


async def load_lora_adapter(request: web.Request) -> web.Response:
    body = parse(LoadBody, await request.read())
    await request.app[API].adapters.register_path(
        body.lora_name, body.lora_path, request_id=request.headers.get(REQUEST_ID_HEADER, ""),
        sharing=Sharing(body.public, tuple(body.shared_with)))
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    body = parse(UnloadBody, await request.read())
    await request.app[API].adapters.delete(body.lora_name)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
