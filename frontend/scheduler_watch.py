"""The frontend's view of its scheduler: a background task on the scheduler's health Watch
stream. The frontend's own health follows it, so a load balancer stops sending to a
frontend whose scheduler is down (a dead scheduler ends the stream at once) and sends again
when it is back (the channel retries the connection within a second: its options are
common/grpc_options.py's internal_channel_options)."""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slora.frontend import metrics

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
                metrics.SCHEDULER_AVAILABLE.set(int(available))
                await set_serving(available)
        except grpc.aio.AioRpcError as e:
            if available is not False:
                log.warning("scheduler unreachable: %s %s", e.code().name, e.details())
        available = False
        metrics.SCHEDULER_AVAILABLE.set(0)
        await set_serving(False)
        await asyncio.sleep(RETRY_S)
