"""`slora replica`: one machine's (or container's) model replicas, without Redis or a
frontend: for each replica a worker on loopback and its scheduler, registered in Redis, on
the public address. The visible GPUs are split between the replicas (launcher.replica_envs).
What compose's `replica` service runs; frontends anywhere route to them through Redis.

    slora replica --replicas 2 --redis-url redis://redis:6379/0 --port 50062 \\
        --internal-secret-file /data/internal.secret -- --model default --data-dir /data

Replica i's scheduler listens on --port + i and registers as `<hostname>-<i>` at
`<advertise host>:<port + i>`; everything after `--` goes to every worker. A child that dies
is restarted; SIGTERM stops them all (the schedulers drain first).
"""
from __future__ import annotations

import argparse
import socket
import sys

from slora.client.launcher import Child, free_port, replica_envs, supervise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slora replica", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=1, help="replicas on this machine")
    p.add_argument("--host", default="0.0.0.0", help="address the schedulers listen on")
    p.add_argument("--port", type=int, default=50062,
                   help="port of replica 0's scheduler; replica i listens on port + i")
    p.add_argument("--advertise-host", default=None,
                   help="host frontends dial (default: this machine's address)")
    p.add_argument("--redis-url", required=True, help="the registry of replicas")
    p.add_argument("--redis-password-file", default=None)
    p.add_argument("--internal-secret-file", required=True,
                   help="the deployment's internal secret (shared with the frontends)")
    p.add_argument("--device", default=None,
                   help="cuda or cpu for every worker (default: cuda if present)")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="Prometheus port of replica 0's worker; its scheduler takes the next, "
                        "replica i's the two after those of i-1 (-1: none)")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("worker_args", nargs=argparse.REMAINDER,
                   help="after --: flags for every worker (--model, --data-dir, ...)")
    return p


def build_children(args) -> list[Child]:
    worker_args = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args
    if args.device:
        worker_args = [*worker_args, "--device", args.device]
    advertise = args.advertise_host or socket.gethostbyname(socket.gethostname())
    secret = ["--internal-secret-file", args.internal_secret_file]
    redis = ["--redis-url", args.redis_url]
    if args.redis_password_file:
        redis += ["--redis-password-file", args.redis_password_file]
    children = []
    for i, env in enumerate(replica_envs(args.replicas, args.device)):
        worker_port, port = free_port(), args.port + i
        metrics = ([] if args.metrics_port < 0 else
                   [["--metrics-host", "0.0.0.0",
                     "--metrics-port", str(args.metrics_port + 2 * i + k)] for k in (0, 1)])
        children.append(Child(f"worker-{i}", [
            "slora.worker.server", "--port", str(worker_port), *secret, *worker_args,
            *(metrics[0] if metrics else [])], env=env))
        children.append(Child(f"scheduler-{i}", [
            "slora.scheduler.server", "--host", args.host, "--port", str(port), *secret,
            "--worker-address", f"127.0.0.1:{worker_port}", *redis,
            "--replica-id", f"{socket.gethostname()}-{i}",
            "--advertise-address", f"{advertise}:{port}", "--connect-timeout",
            str(args.start_timeout), *(metrics[1] if metrics else [])]))
    return children


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        children = build_children(args)
    except RuntimeError as e:
        print(f"slora replica: {e}", file=sys.stderr, flush=True)
        return 1
    return supervise(children, args.start_timeout, "slora replica",
                     on_ready=lambda: print(
                         f"slora replica: {args.replicas} replicas registered in Redis, "
                         f"schedulers on ports {args.port}..{args.port + args.replicas - 1}",
                         flush=True))


if __name__ == "__main__":
    sys.exit(main())
