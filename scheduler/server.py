"""The scheduler process: slora.v1.Scheduler over grpc.aio, one per model replica.

Owner: scheduler/. The servicer only translates: requests in through the StepDriver
(driver.py, which holds the planner and drives the worker), events and errors out. Each
SloraError becomes its `grpc_code` with its message. A Submit stream that ends early (the
client cancelled or went away) cancels its request in the planner, freeing its pages at once.

At start the scheduler asks the worker for its Info and rebuilds the worker's EngineConfig
from it (protos/model_info.py), adding only its own limits: the planner's model and pool are
the worker's by construction.

Trust. Every call but health checks needs the deployment's internal secret
(common/internal_auth.py), which only the frontends hold. A Submit's AdapterRef names a path
on the server that the worker will read: the scheduler takes it as given because only an
authenticated frontend, which looked the adapter up in the registry for the calling tenant,
can send one. Pause, Cancel and DropAdapter, which act on every tenant, need it as well.

A Submit carries the client's deadline (gRPC propagates what is left of it from the
frontend); a full queue's RESOURCE_EXHAUSTED carries the retry hint in the
`grpc-retry-pushback-ms` trailing metadata, the key gRPC's retry design reads. Health
(grpc.health.v1) is SERVING while the worker answers; SIGTERM drains (common/lifecycle.py):
NOT_SERVING, new submissions refused with UNAVAILABLE, requests already submitted run to
their end within --shutdown-grace-s.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time

import grpc
from grpc_health.v1 import health_pb2_grpc

from slora.common.aio import run_async
from slora.common.config import EngineConfig
from slora.common.errors import ConfigError, SloraError, bounded
from slora.common.grpc_options import (
    DEFAULT_KEEPALIVE_S, check_keepalive_s, listen, server_options,
)
from slora.common.internal_auth import (
    InternalAuth, add_internal_secret_args, call_metadata, internal_secret,
)
from slora.common.lifecycle import DEFAULT_SHUTDOWN_GRACE_S, Lifecycle, ready_line
from slora.common.logs import add_log_args, request_id_var, setup_logging
from slora.common.metrics import add_metrics_args, start_metrics_server
from slora.protos.model_info import engine_config_from_model_info, model_info_from_config
from slora.scheduler.driver import (
    DEFAULT_HUNG_STEP_FACTOR, DEFAULT_HUNG_STEP_FLOOR_S, WORKER_UP, StepDriver, StreamEnd,
)
from slora.scheduler.metrics import register_driver_stats
from slora.scheduler.planner import Scheduler
from slora.scheduler.registration import Registration
from slora.scheduler.replica_report import ReplicaReport
from slora.scheduler.request import NO_DEADLINE
from slora.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2_grpc

log = logging.getLogger("slora.scheduler")

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

async def _abort(context: grpc.aio.ServicerContext, error: SloraError):
    await context.abort(getattr(grpc.StatusCode, error.grpc_code), bounded(str(error)))


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, driver: StepDriver, model_path: str):
        self.driver = driver
        self._info = model_info_from_config(driver.config, model_path)
        """The worker's Info with this scheduler's limits."""

    async def Submit(self, request, context):
        request_id_var.set(request.request_id)
        time_left_s = context.time_remaining()
        deadline_s = NO_DEADLINE if time_left_s is None else time.monotonic() + time_left_s
        try:
            queue = self.driver.submit(request, deadline_s)
        except SloraError as e:
            if e.grpc_code == "RESOURCE_EXHAUSTED":
                context.set_trailing_metadata(
                    ((RETRY_PUSHBACK_KEY, str(self.driver.retry_pushback_ms())),))
            log.info("request refused: %s", e, extra={"code": e.grpc_code})
            await _abort(context, e)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, StreamEnd):
                    await context.abort(item.code, item.message)
                yield item
                if item.finished:
                    return
        finally:  # also on CancelledError: the client went away
            self.driver.release(request.request_id, queue)

    async def Cancel(self, request, context):
        return scheduler_pb2.CancelResponse(cancelled=self.driver.cancel(request.request_id))

    async def Stats(self, request, context):
        return scheduler_pb2.StatsResponse(values=self.driver.stats())

    async def DropAdapter(self, request, context):
        if not request.adapter_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "adapter_id is empty")
        await self.driver.drop_adapter(request.adapter_id)
        return scheduler_pb2.DropAdapterResponse()

    async def Info(self, request, context):
        return self._info

    async def Pause(self, request, context):
        return scheduler_pb2.PauseResponse(was_paused=self.driver.pause(request.paused))


# -- the process ---------------------------------------------------------------------------

async def serve(args: argparse.Namespace, secret: str) -> None:
    # The ports first: one in use stops this process before it opens a Steps stream, which
    # would replace the stream of the scheduler that holds the port.
    lifecycle = Lifecycle([scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name])
    server = grpc.aio.server(interceptors=[InternalAuth(secret, "scheduler"), lifecycle.calls],
                             options=server_options())
    port = listen(server, "scheduler", args.host, args.port)
    metrics_port = start_metrics_server(args.metrics_host, args.metrics_port)
    channel = grpc.aio.insecure_channel(args.worker_address)
    try:
        info = await worker_pb2_grpc.WorkerStub(channel).Info(
            scheduler_pb2.InfoRequest(), wait_for_ready=True, timeout=args.connect_timeout,
            metadata=call_metadata(secret))
    except grpc.aio.AioRpcError as e:
        raise ConfigError(f"worker at {args.worker_address} did not answer Info within "
                          f"{args.connect_timeout:g} s: {e.code().name} {e.details()}") from None
    finally:
        await channel.close()
    worker_config = engine_config_from_model_info(info)
    config = with_scheduler_limits(
        worker_config, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_queue_len=args.max_queue_len)
    driver = StepDriver(
        Scheduler(config), args.worker_address, worker_config,
        on_worker_available=lambda up: asyncio.ensure_future(lifecycle.set_serving(up)),
        keepalive_s=args.worker_keepalive_s, secret=secret,
        hung_step_factor=args.hung_step_factor, hung_step_floor_s=args.hung_step_floor_s)
    loop_task = asyncio.create_task(driver.run())

    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerService(driver, info.model_path), server)
    health_pb2_grpc.add_HealthServicer_to_server(lifecycle.health, server)
    register_driver_stats(driver.stats, worker_config.device)
    await server.start()
    await lifecycle.set_serving(True)
    log.info("serving %s (%d pages) on %s:%d, worker %s", config.model.name,
             config.pool.num_pages, args.host, port, args.worker_address)

    registration, redis_client = await start_registration(args, driver, port, lifecycle)
    lifecycle.stop_on_signals()
    # A launcher waits for this line; keep its form.
    print(ready_line("scheduler", port, metrics_port), flush=True)
    stop = asyncio.create_task(lifecycle.wait_for_stop())
    done, _ = await asyncio.wait([loop_task, stop], return_when=asyncio.FIRST_COMPLETED)
    if loop_task in done:
        loop_task.result()  # the loop never ends by itself: raise what ended it
    log.info("stopping: %d requests to finish", len(driver.planner.requests))
    if registration is not None:
        registration.task.cancel()
        await registration.leave()  # no new requests routed here while it drains
    await lifecycle.drain(server, args.shutdown_grace_s)
    loop_task.cancel()
    if redis_client is not None:
        await redis_client.aclose()
    await driver.close()


async def start_registration(args, driver: StepDriver, port: int, lifecycle: Lifecycle):
    """Joins the registry of replicas when --redis-url is given; (Registration or None,
    the Redis client or None)."""
    if not args.redis_url:
        return None, None
    from slora.adapter_store.redis_client import connect, read_password
    from slora.adapter_store.replicas import ReplicaPublisher

    address = args.advertise_address or f"{args.host}:{port}"
    replica_id = args.replica_id or address
    client = connect(args.redis_url, socket_timeout_s=2.0,
                     password=read_password(args.redis_password_file))
    registration = Registration(
        ReplicaPublisher(client, replica_id, address, args.replica_ttl_s),
        ReplicaReport(driver.planner, driver.config),
        lambda: driver.worker_down_reason == WORKER_UP and not lifecycle.draining,
        heartbeat_s=args.heartbeat_s)
    await registration.publish_once(force=True)
    registration.task = asyncio.create_task(registration.run())
    log.info("registered as replica %r at %s (TTL %g s)", replica_id, address,
             args.replica_ttl_s)
    return registration, client


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    from slora.adapter_store.replicas import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S

    g = parser.add_argument_group("registry of replicas (frontends route from it)")
    g.add_argument("--redis-url", default=None,
                   help="redis://[:PASSWORD@]host:port/db to register this replica in "
                        "(default: none; frontends then reach it only by --scheduler-address)")
    g.add_argument("--redis-password-file", default=None,
                   help="file with Redis's password, for a URL without one")
    g.add_argument("--replica-id", default=None,
                   help="this replica's name in the registry (default: its address)")
    g.add_argument("--advertise-address", default=None,
                   help="host:port frontends dial (default: --host:port; in Kubernetes the "
                        "pod's DNS name)")
    g.add_argument("--replica-ttl-s", type=float, default=DEFAULT_TTL_S,
                   help="seconds without a heartbeat after which this replica leaves the "
                        "registry")
    g.add_argument("--heartbeat-s", type=float, default=DEFAULT_HEARTBEAT_S,
                   help="seconds between heartbeats (load and adapters are also published "
                        "on change)")


def with_scheduler_limits(config: EngineConfig, *, max_num_seqs: int | None = None,
                          max_num_batched_tokens: int | None = None,
                          max_queue_len: int | None = None) -> EngineConfig:
    """The worker's config with the scheduler's own limits. The worker sized its memory for
    its batch limits, so the scheduler may lower them, never raise them."""
    worker = config.scheduler
    for name, value in (("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
        if value is not None and value > getattr(worker, name):
            raise ConfigError(f"--{name.replace('_', '-')} {value} exceeds the worker's "
                              f"{getattr(worker, name)}; the scheduler may only lower it")
    limits = {k: v for k, v in (("max_num_seqs", max_num_seqs),
                                ("max_num_batched_tokens", max_num_batched_tokens),
                                ("max_queue_len", max_queue_len)) if v is not None}
    return dataclasses.replace(config, scheduler=dataclasses.replace(worker, **limits))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="slora-scheduler",
        description="Serve slora.v1.Scheduler: continuous batching over one worker.")
    parser.add_argument("--worker-address", required=True, help="host:port of the worker")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds to wait at start for the worker to answer")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0,
                        help="port to listen on; 0 picks a free one (printed on the "
                             "SLORA_READY line)")
    g = parser.add_argument_group("limits (default: the worker's; may only be lower)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step")
    g.add_argument("--max-queue-len", type=int, default=1024,
                   help="requests waiting to be admitted; past it Submit is refused "
                        "(RESOURCE_EXHAUSTED)")
    parser.add_argument("--hung-step-factor", type=float, default=DEFAULT_HUNG_STEP_FACTOR,
                        help="a step taking more than this many times its expected time "
                             "(and more than --hung-step-floor-s) means the worker is hung: "
                             "its requests end UNAVAILABLE, health is NOT_SERVING")
    parser.add_argument("--hung-step-floor-s", type=float, default=DEFAULT_HUNG_STEP_FLOOR_S,
                        help="seconds a step may always take before the worker counts as hung")
    parser.add_argument("--shutdown-grace-s", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                        help="on SIGTERM, seconds that submitted requests get to finish")
    parser.add_argument("--worker-keepalive-s", type=float, default=DEFAULT_KEEPALIVE_S,
                        help="seconds between keepalive pings to the worker (a worker whose "
                             "host vanished is found within this + 5 s); at least 1")
    add_internal_secret_args(parser)
    add_replica_args(parser)
    add_metrics_args(parser)
    add_log_args(parser)
    args = parser.parse_args(argv)
    if args.replica_ttl_s <= 0 or not 0 < args.heartbeat_s < args.replica_ttl_s:
        parser.error(f"--heartbeat-s ({args.heartbeat_s:g}) must be positive and below "
                     f"--replica-ttl-s ({args.replica_ttl_s:g})")
    setup_logging("scheduler", args.log_level, args.log_format)
    try:
        check_keepalive_s(args.worker_keepalive_s, "--worker-keepalive-s")
        run_async(serve(args, internal_secret(args)))
    except SloraError as e:
        parser.exit(1, f"slora-scheduler: error: {e}\n")


if __name__ == "__main__":
    main()
