"""The frontend's view of a scheduler: a background task on its health Watch stream, one per
replica (replica_set.py). The frontend's own health follows them, so a load balancer stops
sending to a frontend whose schedulers are all down (a dead scheduler ends the stream at
once) and sends again when one is back (the channel retries the connection within a second:
its options are common/grpc_options.py's internal_channel_options)."""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


log = logging.getLogger("slora.frontend")

RETRY_S = 0.25


async def watch_scheduler(channel: grpc.aio.Channel, set_serving) -> None:
    """Runs until cancelled, calling `await set_serving(bool)` on every change."""
    stub = health_pb2_grpc.HealthStub(channel)
    available = None
    while True:
        try:
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                now_available = reply.status == health_pb2.HealthCheckResponse.SERVING
                if now_available != available:
                    log.info("scheduler %s", "serving" if now_available else "not serving")
                available = now_available
                await set_serving(available)
        except grpc.aio.AioRpcError as e:
            if available is not False:
                log.warning("scheduler unreachable: %s %s", e.code().name, e.details())
        available = False
        await set_serving(False)
        await asyncio.sleep(RETRY_S)
