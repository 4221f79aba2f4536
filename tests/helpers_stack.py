"""The whole stack as real processes on loopback: the embedded valkey, the worker, the
scheduler and the frontend, each started, stopped (SIGTERM: it drains), killed (SIGKILL) and
restarted on its own port; the scheduler's Stats and Pause; each process's metrics page,
resident memory and JSON log lines; the frontend's OpenAI HTTP API (`Stack.http_url`).

Import from a test as `from helpers_stack import Stack, worker_argv` (pytest puts tests/ on
sys.path). The frontend runs with auth on: it makes the admin key at its first start and
writes it to <root>/admin.key, and `Stack.client()` calls with it. `auth=False` starts the
frontend with --no-auth instead. The internal services need the deployment's secret, made
by the first process in <root>/internal.secret (`Stack.internal_metadata()` for a raw call
to the scheduler or the worker); valkey needs its password (<root>/redis/password, in
`Stack.redis_url`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from dataclasses import dataclass, field

import grpc

from helpers_procs import slora_module, start_process, stderr_tail, stop_process
from slora.adapter_store.embedded_redis import PASSWORD_FILE, url_with_password
from slora.client import Client
from slora.common.internal_auth import call_metadata, load_or_create_secret
from slora.v1 import common_pb2, generation_pb2, scheduler_pb2, scheduler_pb2_grpc

START_TIMEOUT_S = 120.0
ORDER = ("redis", "worker", "scheduler", "frontend")
"""Start order; stop order is the reverse."""
PROCESS_ENV = {"OMP_NUM_THREADS": "1"}
"""Four processes and the test share a CI machine's few cores: torch's OpenMP pool would
spin on cores the others need (a step of the tiny model then takes 10x longer)."""
METRICS_PORT_PATTERN = re.compile(r"\bmetrics_port=(-?\d+)")
HTTP_PORT_PATTERN = re.compile(r"\bhttp_port=(-?\d+)")
PID_PATTERN = re.compile(r"\bpid=(\d+)")


def worker_argv(base: str, **overrides) -> list[str]:
    """Worker flags for the tiny test model on the CPU; `overrides` replace flags by name
    (max_model_len=512 -> --max-model-len 512)."""
    flags = dict(model=base, device="cpu", dtype="float32", num_pages=2048, max_lora_rank=16,
                 max_adapter_slots=8, max_model_len=96, max_num_seqs=32,
                 max_num_batched_tokens=256)
    flags.update(overrides)
    return [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]


class Stack:
    def __init__(self, root: str, base: str, worker_args: list[str],
                 scheduler_args: list[str] = (), *, adapter_roots: list[str] = (),
                 auth: bool = True, frontend_args: list[str] = ()):
        self.root, self.base = root, base
        self.worker_args = list(worker_args)
        self.scheduler_args = list(scheduler_args)
        self.auth = auth
        self.frontend_args = ["--no-auth"] if not auth else [
            "--admin-key-file", os.path.join(root, "admin.key")]
        for folder in adapter_roots:
            self.frontend_args += ["--adapter-roots", folder]
        self.frontend_args += list(frontend_args)
        self.procs: dict[str, object] = {}
        self.ports: dict[str, int] = {}
        """Each process keeps its port across restarts."""
        self.metrics_ports: dict[str, int] = {}
        self.http_port = 0
        """The frontend's OpenAI API port (kept across its restarts too)."""

    # -- processes ----------------------------------------------------------------------

    def _argv(self, name: str) -> list[str]:
        port = ["--port", str(self.ports.get(name, 0))]
        secret = ["--internal-secret-file", self.secret_file]
        if name == "redis":
            return slora_module("slora.adapter_store.embedded_redis", "--data-dir",
                                os.path.join(self.root, "redis"), *port)
        if name == "worker":
            return slora_module("slora.worker.server", *port, *secret, *self.worker_args)
        if name == "scheduler":
            return slora_module("slora.scheduler.server", *port, *secret, "--worker-address",
                                f"127.0.0.1:{self.ports['worker']}", *self.scheduler_args)
        return slora_module("slora.frontend.server", *port, *secret,
                            "--scheduler-address", f"127.0.0.1:{self.ports['scheduler']}",
                            "--redis-url", f"redis://127.0.0.1:{self.ports['redis']}/0",
                            "--redis-password-file", self.redis_password_file,
                            "--data-dir", os.path.join(self.root, "data"),
                            "--http-port", str(self.http_port), *self.frontend_args)

    def start(self, name: str) -> None:
        proc, self.ports[name] = start_process(self._argv(name), f"SLORA_READY {name}",
                                               timeout=START_TIMEOUT_S, env=PROCESS_ENV)
        self.procs[name] = proc
        match = METRICS_PORT_PATTERN.search(proc.ready_line)
        if match:
            self.metrics_ports[name] = int(match.group(1))
        match = HTTP_PORT_PATTERN.search(proc.ready_line)
        if match:
            self.http_port = int(match.group(1))

    def stop(self, name: str, timeout: float = 10.0) -> int:
        """SIGTERM (the process drains), SIGKILL after `timeout`; returns the exit status."""
        return stop_process(self.procs.pop(name), timeout)

    def kill(self, name: str) -> None:
        """SIGKILL, as `kill -9` would; the process is gone when this returns."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop_process(proc)

    def start_all(self) -> "Stack":
        try:
            for name in ORDER:
                self.start(name)
        except BaseException:
            self.stop_all()
            raise
        return self

    def stop_all(self) -> None:
        for name in reversed(ORDER):
            if name in self.procs:
                self.stop(name)

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def stderr(self, name: str) -> str:
        """All the process has written on stderr so far."""
        return stderr_tail(self.procs[name], num_chars=1 << 30)

    def log_lines(self, name: str) -> list[dict]:
        """The process's JSON log lines so far (stderr lines that are not JSON are skipped)."""
        lines = []
        for line in self.stderr(name).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                lines.append(entry)
        return lines

    # -- talking to it ------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['frontend']}"

    @property
    def secret_file(self) -> str:
        return os.path.join(self.root, "internal.secret")

    @property
    def redis_password_file(self) -> str:
        return os.path.join(self.root, "redis", PASSWORD_FILE)

    @property
    def http_url(self) -> str:
        """The OpenAI API's base URL (what `openai.OpenAI(base_url=...)` takes)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def redis_url(self) -> str:
        """With the password."""
        with open(self.redis_password_file) as f:
            return url_with_password("127.0.0.1", self.ports["redis"], f.read().strip())

    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of a raw call to the scheduler or the worker (the internal secret)."""
        return call_metadata(load_or_create_secret(self.secret_file))

    @property
    def admin_key(self) -> str | None:
        """The admin key the frontend wrote at its first start; None with auth off."""
        if not self.auth:
            return None
        with open(os.path.join(self.root, "admin.key")) as f:
            return f.read().strip()

    def client(self, **kwargs) -> Client:
        """An SDK client of the frontend, calling with the admin key."""
        kwargs.setdefault("timeout_s", 120)
        kwargs.setdefault("retries", 2)
        if self.auth:
            kwargs.setdefault("api_key", self.admin_key)
        return Client(self.address, **kwargs)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of a raw gRPC call to the frontend (the admin key)."""
        return (("authorization", f"Bearer {self.admin_key}"),) if self.auth else ()

    def _scheduler(self):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.ports['scheduler']}")
        return channel, scheduler_pb2_grpc.SchedulerStub(channel)

    def stats(self) -> dict[str, int]:
        channel, stub = self._scheduler()
        with channel:
            return dict(stub.Stats(scheduler_pb2.StatsRequest(), timeout=10,
                                   metadata=self.internal_metadata()).values)

    def pause(self, paused: bool = True) -> bool:
        """Pauses (or resumes) the scheduler's steps; returns whether it was paused."""
        channel, stub = self._scheduler()
        with channel:
            return stub.Pause(scheduler_pb2.PauseRequest(paused=paused), timeout=10,
                              metadata=self.internal_metadata()).was_paused

    @contextlib.contextmanager
    def paused(self):
        """The scheduler paused for the block (once the pool is idle) and resumed after it;
        the block's requests must then leave nothing waiting and no KV page behind."""
        self.wait_pool_idle()
        self.pause(True)
        try:
            yield self
        finally:
            self.pause(False)
        idle = self.wait_pool_idle(timeout_s=30)
        assert idle["num_waiting"] == 0 and idle["pages_kv"] == 0, idle

    def wait_for_stats(self, done, timeout_s: float = 10.0) -> dict[str, int]:
        """Polls Stats until `done(values)`; returns the last values either way."""
        deadline = time.monotonic() + timeout_s
        while True:
            values = self.stats()
            if done(values) or time.monotonic() > deadline:
                return values
            time.sleep(0.05)

    def wait_pool_idle(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Waits until nothing runs or waits and no page holds KV; returns the stats."""
        return self.wait_for_stats(lambda v: v["pages_kv"] == 0 and v["num_running"] == 0
                                   and v["num_waiting"] == 0, timeout_s)

    def metrics_text(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def rss_bytes(self, name: str) -> int:
        with open(f"/proc/{self.procs[name].pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- raw gRPC calls, for status codes, trailers and timings -------------------------------

@dataclass
class Outcome:
    """How one call to the frontend ended."""

    code: grpc.StatusCode
    details: str = ""
    trailers: dict[str, str] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0
    """From the call to its end."""
    first_token_s: float | None = None
    """From the call to its first token; None without one."""


def generate_request(prompt_token_ids: list[int], max_new_tokens: int, *, adapter_id: str = "",
                     ignore_eos: bool = True, request_id: str = ""
                     ) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id, adapter_id=adapter_id,
        prompt_token_ids=generation_pb2.TokenIds(ids=prompt_token_ids),
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens,
                                           ignore_eos=ignore_eos))


async def stream_outcome(stub, request, *, metadata=(), timeout: float | None = None,
                         on_first_token=None) -> Outcome:
    """Runs GenerateStream to its end; `on_first_token()` is awaited after the first token."""
    start = time.monotonic()
    out = Outcome(grpc.StatusCode.OK)
    call = stub.GenerateStream(request, metadata=metadata, timeout=timeout)
    try:
        async for event in call:
            if event.token_ids and out.first_token_s is None:
                out.first_token_s = time.monotonic() - start
                out.token_ids += event.token_ids
                if on_first_token is not None:
                    await on_first_token()
                continue
            out.token_ids += event.token_ids
    except grpc.aio.AioRpcError as e:
        out.code, out.details = e.code(), e.details() or ""
        out.trailers = dict(e.trailing_metadata() or ())
    out.seconds = time.monotonic() - start
    return out


async def streams_past_first_token(stub, calls, timeout: float = 120.0,
                                   first_token_within_s: float = 60.0) -> list:
    """Starts GenerateStream for each (request, metadata) of `calls`; returns their tasks
    (each giving an Outcome) once every one has its first token."""
    started = asyncio.Semaphore(0)

    async def on_first():
        started.release()

    tasks = [asyncio.create_task(stream_outcome(stub, request, metadata=md, timeout=timeout,
                                                on_first_token=on_first))
             for request, md in calls]
    for _ in tasks:
        await asyncio.wait_for(started.acquire(), first_token_within_s)
    return tasks
