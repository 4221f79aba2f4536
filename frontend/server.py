"""The frontend process: public Generation and Adapters services, standard health checking
(grpc.health.v1) and server reflection, on grpc.aio with uvloop.

It is stateless: the model's limits come from the scheduler's Info at start, adapter
metadata from Redis on every call. Any number can run behind a load balancer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from slora.adapter_store.registry import AdapterRegistry, connect
from slora.common.aio import run_async
from slora.common.config import ModelConfig
from slora.frontend.adapters import AdaptersService
from slora.frontend.generation import GenerationService
from slora.frontend.tokenizer import load_tokenizer
from slora.v1 import (
    adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc, scheduler_pb2,
    scheduler_pb2_grpc,
)

log = logging.getLogger("slora.frontend")

MAX_MESSAGE_BYTES = 64 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slora-frontend", description=__doc__.splitlines()[0])
    p.add_argument("--scheduler-address", required=True, help="host:port of the scheduler")
    p.add_argument("--redis-url", required=True, help="redis://host:port/db of adapter metadata")
    p.add_argument("--data-dir", required=True,
                   help="folder of the adapter store (shared with the workers)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    p.add_argument("--tokenizer", default=None,
                   help="folder with tokenizer.json (default: the served model's folder)")
    p.add_argument("--max-upload-bytes", type=int, default=4 << 30,
                   help="largest adapter upload, in bytes")
    return p


async def wait_for_scheduler(stub, timeout_s: float = 120.0) -> scheduler_pb2.ModelInfo:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await stub.Info(scheduler_pb2.InfoRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def serve(args) -> None:
    channel = grpc.aio.insecure_channel(args.scheduler_address, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
    info = await wait_for_scheduler(scheduler)
    model = ModelConfig.from_hf_dict(json.loads(info.model_config_json),
                                     name=info.model_name)
    tokenizer = load_tokenizer(args.tokenizer or info.model_path or None, info.vocab_size)
    redis_client = connect(args.redis_url)
    store_dir = os.path.join(args.data_dir, "adapters")
    registry = AdapterRegistry(redis_client, store_dir, model, info.model_name,
                               info.max_lora_rank)

    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationService(scheduler, registry, tokenizer, info), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(
        AdaptersService(registry, scheduler, store_dir, args.max_upload_bytes), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
             adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
             health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    for name in ("", *names[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"SLORA_READY frontend port={port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for name in ("", *names[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5)
    await redis_client.aclose()
    await channel.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_async(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
