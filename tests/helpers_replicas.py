"""Several replicas and frontends as real processes on loopback: one embedded valkey, N
replicas (a worker and a scheduler that registers in Redis), and any number of frontends
that route from the registry. Processes of one kind start in parallel (each imports torch:
seconds of CPU); kill() is kill -9.

Import from a test as `from helpers_replicas import Cluster` (pytest puts tests/ on
sys.path).
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal

import grpc

from helpers_procs import slora_module, start_process, stop_process
from helpers_stack import PROCESS_ENV, START_TIMEOUT_S
from slora.adapter_store.embedded_redis import PASSWORD_FILE, url_with_password
from slora.common.internal_auth import call_metadata, load_or_create_secret
from slora.v1 import scheduler_pb2, scheduler_pb2_grpc


class Cluster:
    def __init__(self, root: str, worker_args: list[str], *, replica_ttl_s: float = 3.0,
                 heartbeat_s: float = 0.5, adapter_roots: list[str] = ()):
        self.root = root
        self.worker_args = list(worker_args)
        self.replica_ttl_s, self.heartbeat_s = replica_ttl_s, heartbeat_s
        self.adapter_roots = list(adapter_roots)
        self.procs: dict[str, object] = {}
        self.ports: dict[str, int] = {}

    @property
    def redis_url(self) -> str:
        """Without the password (the processes read it from redis_password_file)."""
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    @property
    def redis_password_file(self) -> str:
        return os.path.join(self.root, "redis", PASSWORD_FILE)

    @property
    def redis_url_with_password(self) -> str:
        with open(self.redis_password_file) as f:
            return url_with_password("127.0.0.1", self.ports["redis"], f.read().strip())

    @property
    def secret_file(self) -> str:
        return os.path.join(self.root, "internal.secret")

    def _start(self, name: str, argv: list[str], ready: str) -> None:
        proc, self.ports[name] = start_process(argv, ready, timeout=START_TIMEOUT_S,
                                               env=PROCESS_ENV)
        self.procs[name] = proc

    def _start_many(self, specs: list[tuple[str, list[str], str]]) -> None:
        with cf.ThreadPoolExecutor(len(specs)) as pool:
            for future in [pool.submit(self._start, *spec) for spec in specs]:
                future.result()

    def start(self, num_replicas: int, frontends: dict[str, list[str]]) -> "Cluster":
        """Redis, then `num_replicas` workers, their schedulers (r0, r1, ...), then one
        frontend per entry of `frontends` (name -> extra flags)."""
        try:
            self._start("redis", slora_module(
                "slora.adapter_store.embedded_redis", "--data-dir",
                os.path.join(self.root, "redis"), "--port", "0"), "SLORA_READY redis")
            load_or_create_secret(self.secret_file)  # before the workers race to make it
            secret = ["--internal-secret-file", self.secret_file]
            redis_flags = ["--redis-url", self.redis_url,
                           "--redis-password-file", self.redis_password_file]
            self._start_many([(f"worker-r{i}", slora_module(
                "slora.worker.server", "--port", "0", *secret, *self.worker_args),
                "SLORA_READY worker") for i in range(num_replicas)])
            self._start_many([(f"scheduler-r{i}", slora_module(
                "slora.scheduler.server", "--port", "0", *secret, "--worker-address",
                f"127.0.0.1:{self.ports[f'worker-r{i}']}", *redis_flags,
                "--replica-id", f"r{i}", "--replica-ttl-s", str(self.replica_ttl_s),
                "--heartbeat-s", str(self.heartbeat_s)), "SLORA_READY scheduler")
                for i in range(num_replicas)])
            roots = [x for root in self.adapter_roots for x in ("--adapter-roots", root)]
            self._start_many([(name, slora_module(
                "slora.frontend.server", "--port", "0", *secret, *redis_flags,
                "--data-dir", os.path.join(self.root, "data"), "--no-auth", *roots,
                *flags), "SLORA_READY frontend") for name, flags in frontends.items()])
        except BaseException:
            self.stop_all()
            raise
        return self

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop_process(proc)

    def stop_all(self) -> None:
        """SIGTERM to every process of a kind at once (frontends, then schedulers, then
        workers, then Redis), SIGKILL after 10 s."""
        def kind(name: str) -> int:
            return (["scheduler", "worker", "redis"].index(name.split("-")[0]) + 1
                    if name.split("-")[0] in ("scheduler", "worker", "redis") else 0)

        for k in range(4):
            names = [n for n in self.procs if kind(n) == k]
            if names:
                with cf.ThreadPoolExecutor(len(names)) as pool:
                    list(pool.map(lambda n: stop_process(self.procs.pop(n), 10.0), names))

    def stats(self, replica: str) -> dict[str, int]:
        with grpc.insecure_channel(self.address(f"scheduler-{replica}")) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            return dict(stub.Stats(scheduler_pb2.StatsRequest(), timeout=10, metadata=call_metadata(
                load_or_create_secret(self.secret_file))).values)
