"""The frontend process: public Generation and Adapters services, standard health checking
(grpc.health.v1) and server reflection (v1 and v1alpha), on grpc.aio with uvloop; and the
OpenAI-compatible HTTP API (frontend/http/) in the same event loop on --http-port, calling
the same services.

It is stateless: the model's limits come from a scheduler's Info at start, adapter
metadata from Redis on every call (with a short stale-if-error cache in memory,
adapter_records.py), and the replicas to route to from the registry of replicas in Redis
(replica_set.py, routing.py; --scheduler-address while none is registered). Any number can
run behind a load balancer.

Every public call carries an API key (auth.py; flags, admin key and TLS in security.py).

Health is SERVING while a replica is available: a registered one, or the
--scheduler-address's scheduler while its health is SERVING (scheduler_watch.py). SIGTERM drains
(common/lifecycle.py): NOT_SERVING, new calls refused with UNAVAILABLE, running calls finish
within --shutdown-grace-s.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from slora.adapter_store.registry import AdapterRegistry, connect, read_password
from slora.common.aio import run_async
from slora.common.errors import ConfigError, SloraError
from slora.common.grpc_options import internal_channel_options, server_options
from slora.common.internal_auth import add_internal_secret_args, internal_secret, send_secret
from slora.common.lifecycle import DEFAULT_SHUTDOWN_GRACE_S, Lifecycle, ready_line
from slora.common.logs import add_log_args, setup_logging
from slora.common.metrics import add_metrics_args, start_metrics_server
from slora.frontend import metrics
from slora.frontend.adapters import AdaptersService
from slora.frontend.generation import DEFAULT_MAX_PROMPT_BYTES, GenerationService
from slora.frontend.http.app import add_http_args, start_http
from slora.frontend.http.state import HttpApi
from slora.frontend.keys import KeysService
from slora.frontend.reflection import enable_reflection
from slora.frontend.replica_set import ReplicaSet
from slora.frontend.routing import DEFAULT_LOAD_FACTOR, POLICIES, Router
from slora.frontend.security import add_security_args, bind_public_port, setup_security
from slora.frontend.tokenizer import load_tokenizer
from slora.protos.model_info import model_config_from_model_info
from slora.v1 import (
    adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc, keys_pb2,
    keys_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc,
)

log = logging.getLogger("slora.frontend")

MAX_MESSAGE_BYTES = 64 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slora-frontend", description=__doc__.splitlines()[0])
    p.add_argument("--scheduler-address", default=None,
                   help="host:port of the scheduler, used while no replica is registered in "
                        "Redis (default: none; route only to registered replicas)")
    p.add_argument("--routing", choices=POLICIES, default=POLICIES[0],
                   help="how a request picks its replica (frontend/routing.py)")
    p.add_argument("--load-factor", type=float, default=DEFAULT_LOAD_FACTOR,
                   help="adapter-affinity: a replica takes more while its requests stay "
                        "below this multiple of the mean load")
    p.add_argument("--replica-wait-s", type=float, default=120.0,
                   help="at start, seconds to wait for a replica to answer")
    p.add_argument("--redis-url", required=True,
                   help="redis://[:PASSWORD@]host:port/db of adapter metadata")
    p.add_argument("--redis-password-file", default=None,
                   help="file with Redis's password (the embedded one's is "
                        "<its data dir>/password), for a URL without one")
    p.add_argument("--data-dir", required=True,
                   help="folder of the adapter store (shared with the workers)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    p.add_argument("--tokenizer", default=None,
                   help="folder with tokenizer.json (default: the served model's folder)")
    p.add_argument("--max-upload-bytes", type=int, default=4 << 30,
                   help="largest adapter upload, in bytes")
    p.add_argument("--strict-base-model", action="store_true",
                   help="refuse adapters whose base_model_name_or_path is not the served "
                        "model's name (default: accept them with a warning when the shapes fit)")
    p.add_argument("--max-prompt-bytes", type=int, default=DEFAULT_MAX_PROMPT_BYTES,
                   help="largest text prompt, in UTF-8 bytes (checked before tokenizing)")
    p.add_argument("--shutdown-grace-s", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                   help="on SIGTERM, seconds that running calls get to finish")
    add_http_args(p)
    add_security_args(p)
    add_internal_secret_args(p)
    add_metrics_args(p)
    add_log_args(p)
    return p


async def wait_for_scheduler(replicas: ReplicaSet,
                             timeout_s: float) -> scheduler_pb2.ModelInfo:
    """The model's Info from the first replica that answers."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        left = deadline - asyncio.get_running_loop().time()
        replica = await replicas.wait_for_replica(max(left, 0.0))
        try:
            info = await replicas.stub(replica.address).Info(scheduler_pb2.InfoRequest(),
                                                             timeout=5)
            replicas.mark_reachable(replica.address)
            return info
        except grpc.aio.AioRpcError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def serve(args) -> None:
    redis_client = connect(args.redis_url, password=read_password(args.redis_password_file))
    secret = send_secret(internal_secret(args))
    replicas = ReplicaSet(redis_client, Router(args.routing, args.load_factor),
                          args.scheduler_address, internal_channel_options(), secret)
    info = await wait_for_scheduler(replicas, args.replica_wait_s)
    model = model_config_from_model_info(info)
    tokenizer = load_tokenizer(args.tokenizer or info.model_path or None, info.vocab_size)
    store_dir = os.path.join(args.data_dir, "adapters")
    registry = AdapterRegistry(redis_client, store_dir, model, info.model_name,
                               info.max_lora_rank, strict_base_model=args.strict_base_model)
    security = await setup_security(args, redis_client, store_dir)

    public_names = [generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
                    keys_pb2.DESCRIPTOR.services_by_name["Keys"].full_name]
    lifecycle = Lifecycle(public_names, on_call_done=metrics.on_call_done)
    server = grpc.aio.server(interceptors=[lifecycle.calls, security.interceptor],
                             options=server_options(MAX_MESSAGE_BYTES))
    generation = GenerationService(replicas, registry, tokenizer, info, args.max_prompt_bytes)
    adapters = AdaptersService(registry, replicas, store_dir, args.max_upload_bytes,
                               security.roots, args.max_adapters_per_tenant)
    generation_pb2_grpc.add_GenerationServicer_to_server(generation, server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(adapters, server)
    keys_pb2_grpc.add_KeysServicer_to_server(KeysService(security.keys), server)
    health_pb2_grpc.add_HealthServicer_to_server(lifecycle.health, server)
    enable_reflection((*public_names, health.SERVICE_NAME), server)
    port = bind_public_port(server, args)
    metrics_port = start_metrics_server(args.metrics_host, args.metrics_port)
    await server.start()
    try:
        http_runner, http_port = await start_http(
            args, HttpApi(generation, adapters, security.interceptor, lifecycle, info))
    except ConfigError:  # its port is in use: stop the gRPC server before saying so
        await server.stop(grace=None)
        raise
    await lifecycle.set_serving(True)
    watcher = asyncio.create_task(replicas.run(on_serving=lifecycle.set_serving))
    lifecycle.stop_on_signals()
    print(ready_line("frontend", port, metrics_port, http_port=http_port), flush=True)

    await lifecycle.wait_for_stop()
    await lifecycle.drain(server, args.shutdown_grace_s)
    if http_runner is not None:
        await http_runner.cleanup()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await redis_client.aclose()
    await replicas.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.load_factor < 1.0:
        parser.error(f"--load-factor must be at least 1 (a replica's share of the mean load), "
                     f"got {args.load_factor:g}")
    setup_logging("frontend", args.log_level, args.log_format)
    try:
        run_async(serve(args))
    except SloraError as e:  # a bad flag, a port in use: say which and stop
        print(f"slora-frontend: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
