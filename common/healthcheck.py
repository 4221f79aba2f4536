"""A probe for grpc.health.v1: `python -m slora.common.healthcheck HOST:PORT [--service S]`.

Exits 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unknown service, no answer
within the timeout), printing what it saw. compose.yaml's healthchecks and Kubernetes' exec
probes run it inside the image, which has no grpc_health_probe binary.
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(whether `service` at `address` is SERVING, what the server said or why not)."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as e:
        return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m slora.common.healthcheck",
        description="Exit 0 if a gRPC server's grpc.health.v1 status is SERVING.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of the server")
    parser.add_argument("--service", default="", help="service name; empty: the whole server")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="seconds to wait")
    args = parser.parse_args(argv)
    serving, said = check(args.address, args.service, args.timeout_s)
    print(f"{args.address} {args.service or '(server)'}: {said}")
    sys.exit(0 if serving else 1)


if __name__ == "__main__":
    main()
