"""The admin Keys service: create, list and revoke API keys (adapter_store/keys.py). Only
admin keys get here: AuthInterceptor refuses the others with PERMISSION_DENIED. With auth
off (--no-auth) there are no keys: every method answers FAILED_PRECONDITION saying so."""
from __future__ import annotations

from slora.adapter_store.keys import ApiKey, KeyStore
from slora.common.errors import SloraError


class AuthOffError(SloraError):
    grpc_code = "FAILED_PRECONDITION"


AUTH_OFF = AuthOffError("auth is off (the frontend runs with --no-auth): there are no API "
                        "keys to create, list or revoke")
from slora.frontend.generation import abort_with
from slora.v1 import keys_pb2, keys_pb2_grpc


def key_to_proto(k: ApiKey) -> keys_pb2.ApiKey:
    return keys_pb2.ApiKey(key_id=k.key_id, tenant=k.tenant, admin=k.admin,
                           description=k.description, created_unix=k.created_unix,
                           revoked_unix=k.revoked_unix)


class KeysService(keys_pb2_grpc.KeysServicer):
    def __init__(self, keys: KeyStore | None):
        """`keys`: None when auth is off."""
        self.keys = keys

    async def Create(self, request, context):
        if self.keys is None:
            await abort_with(context, AUTH_OFF)
        try:
            record, secret = await self.keys.create(request.tenant, admin=request.admin,
                                                    description=request.description)
        except SloraError as e:
            await abort_with(context, e)
        return keys_pb2.CreateKeyResponse(key=key_to_proto(record), secret=secret)

    async def List(self, request, context):
        if self.keys is None:
            await abort_with(context, AUTH_OFF)
        try:
            records = await self.keys.list(request.tenant,
                                           include_revoked=request.include_revoked)
        except SloraError as e:
            await abort_with(context, e)
        return keys_pb2.ListKeysResponse(keys=[key_to_proto(k) for k in records])

    async def Revoke(self, request, context):
        if self.keys is None:
            await abort_with(context, AUTH_OFF)
        try:
            record = await self.keys.revoke(request.key_id)
        except SloraError as e:
            await abort_with(context, e)
        return keys_pb2.RevokeKeyResponse(key=key_to_proto(record))
