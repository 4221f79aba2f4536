"""`slora up`: the whole stack as child processes of one command.

Starts, in order, the embedded Redis (unless --redis-url), the worker and the scheduler of
each replica (--replicas N: N of each, the visible GPUs split between them, each scheduler
registered in Redis), and the frontend, which routes across them, each a real entry point
of the package on loopback ports; waits for each
one's `SLORA_READY <name> port=N` line; prints where the stack listens; restarts a child
that dies; and on Ctrl-C or SIGTERM stops them all, last started first, each draining
(SIGTERM). A second Ctrl-C (or SIGTERM) kills whatever is left at once. With
--tensor-parallel-size N the worker child is rank 0 of the group and starts the other N-1
ranks itself; a group whose rank fails exits as a whole (worker/server.py), and is restarted
like any worker.

Metrics: `--metrics-port N` puts the frontend's Prometheus endpoint on N, and replica i's
scheduler on N+1+2i and its worker on N+2+2i (one replica: scheduler N+1, worker N+2), so a
static scrape config finds them; without it each takes a free port, printed at start. Logs:
`--log-format text` or `json` for the services; `auto` picks text when our stdout is a
terminal. Every line goes out whole (`say`): the children's pump threads and the main thread
print at once.

A hung worker is restarted as a dead one: the launcher checks its health (grpc.health.v1,
worker/liveness.py) every second, and one that has answered no check with SERVING for
HUNG_AFTER_S (stopped, wedged, or stuck inside a step) is killed, then restarted.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slora.adapter_store.embedded_redis import PASSWORD_FILE
from slora.common.internal_auth import SECRET_FILE_NAME
from slora.common.lifecycle import DEFAULT_SHUTDOWN_GRACE_S, python_module_command

READY_PREFIX = "SLORA_READY"
HEALTH_CHECK_TIMEOUT_S = 2.0
HUNG_AFTER_S = 6.0
"""Seconds without a SERVING answer after which a ready worker is killed and restarted."""
STOP_GRACE_S = DEFAULT_SHUTDOWN_GRACE_S + 5.0
"""A child's drain on SIGTERM may take its grace period; after this it is killed."""
DRAINING_LINE = (f"slora: draining (running requests get up to {DEFAULT_SHUTDOWN_GRACE_S:.0f} s), "
                 "Ctrl-C again to stop now")
_print_lock = threading.RLock()
"""Reentrant: the signal handler prints from the main thread, which may hold it."""


def say(text: str) -> None:
    """One whole line on stdout (print() writes the text and its newline separately)."""
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def metrics_port_of(base: int | None, service: str, replica: int = 0) -> int:
    """--metrics-port N: frontend N, replica i's scheduler N+1+2i and worker N+2+2i; None:
    0, a free port."""
    if base is None:
        return 0
    return base if service == "frontend" else \
        base + 1 + 2 * replica + (service == "worker")


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    port: int = 0
    metrics_port: int = 0
    http_port: int = -1
    """The frontend's OpenAI API port; -1: none."""
    ready: threading.Event = field(default_factory=threading.Event)
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """Set in the child's environment (a replica's CUDA_VISIBLE_DEVICES)."""
    health_checked: bool = False
    """Killed and restarted when its health has not been SERVING for HUNG_AFTER_S."""
    last_serving_at: float = 0.0

    def start(self, timeout_s: float) -> int:
        self.ready.clear()
        self.proc = subprocess.Popen(
            python_module_command(*self.args), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            env={**os.environ, **self.env} if self.env else None)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} "
                                   "before it was ready (its output is above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f} s")
        self.last_serving_at = time.monotonic()
        return self.port

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            say(f"[{self.name}] {line}")
            if line.startswith(READY_PREFIX):
                fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
                self.port = int(fields.get("port", 0))
                self.metrics_port = int(fields.get("metrics_port", 0))
                self.http_port = int(fields.get("http_port", -1))
                self.ready.set()

    def check_health(self) -> None:
        """Kills a ready child whose health has not been SERVING for HUNG_AFTER_S (the
        supervising loop then restarts it like one that died)."""
        if not (self.health_checked and self.ready.is_set() and self.alive()):
            return
        now = time.monotonic()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=HEALTH_CHECK_TIMEOUT_S).status
        except grpc.RpcError:
            status = None
        if status == health_pb2.HealthCheckResponse.SERVING:
            self.last_serving_at = time.monotonic()
        elif now - self.last_serving_at > HUNG_AFTER_S:
            print(f"slora: {self.name} has not been healthy for {now - self.last_serving_at:.1f}"
                  " s (hung); killing it", flush=True)
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self, wait: bool = True) -> None:
        """SIGKILL to the child's process group (its own children too: valkey-server)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if wait and self.proc is not None:
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """RuntimeError naming the port if something listens on it (before anything starts:
    the frontend would only find out after the model has loaded)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror} (another slora "
                               "stack, or another program? stop it, or pass --port)") from None


def build_children(args, model: str) -> list[Child]:
    """The children with fixed loopback ports, so a restarted one is found where it was."""
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    children = []
    redis_url, redis_password = args.redis_url, []
    if not redis_url:
        redis_port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        redis_dir = os.path.join(data_dir, "redis")
        redis_password = ["--redis-password-file", os.path.join(redis_dir, PASSWORD_FILE)]
        children.append(Child("redis", ["slora.adapter_store.embedded_redis", "--data-dir",
                                        redis_dir, "--port", str(redis_port)]))
    # The internal ports take only calls with this secret (made by the first to start).
    secret = ["--internal-secret-file", os.path.join(data_dir, SECRET_FILE_NAME)]
    engine_args = ["--model", model, "--max-model-len", str(args.max_model_len)]
    for flag in ("num_pages", "pool_gib", "gpu_memory_utilization", "device", "dtype",
                 "max_lora_rank", "max_num_seqs", "tensor_parallel_size", "collective_timeout_s"):
        value = getattr(args, flag, None)
        if value is not None:
            engine_args += [f"--{flag.replace('_', '-')}", str(value)]
    log_format = getattr(args, "log_format", "auto")
    if log_format == "auto":
        log_format = "text" if sys.stdout.isatty() else "json"

    def service_args(service: str, replica: int = 0) -> list[str]:
        port = metrics_port_of(getattr(args, "metrics_port", None), service, replica)
        return ["--metrics-port", str(port), "--log-format", log_format]

    hung_step_args = ([] if getattr(args, "hung_step_floor_s", None) is None
                      else ["--hung-step-floor-s", str(args.hung_step_floor_s)])
    scheduler_ports = []
    for i, env in enumerate(replica_envs(args.replicas, args.device)):
        worker_port, scheduler_port = free_port(), free_port()
        suffix = f"-{i}" if args.replicas > 1 else ""
        children.append(Child(f"worker{suffix}", ["slora.worker.server", "--port",
                                                  str(worker_port), *secret, *engine_args,
                                                  *service_args("worker", i)], env=env,
                              health_checked=True))
        children.append(Child(f"scheduler{suffix}", [
            "slora.scheduler.server", "--port", str(scheduler_port), *secret,
            "--worker-address", f"127.0.0.1:{worker_port}", "--redis-url", redis_url,
            *redis_password, "--replica-id", f"r{i}", *service_args("scheduler", i),
            *hung_step_args]))
        scheduler_ports.append(scheduler_port)
    # Frontends route to the replicas registered in Redis; with one replica it is also
    # reached by address while it has not registered yet.
    static = (["--scheduler-address", f"127.0.0.1:{scheduler_ports[0]}"]
              if args.replicas == 1 else [])
    children.append(Child("frontend", [
        "slora.frontend.server", "--host", args.host, "--port", str(args.port),
        "--http-port", str(args.http_port),
        "--data-dir", data_dir, *static, *secret, "--redis-url", redis_url, *redis_password,
        *frontend_security_args(args, data_dir),
        *(["--strict-base-model"] if getattr(args, "strict_base_model", False) else []),
        *service_args("frontend")]))
    return children


def visible_gpus(device: str | None) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else those torch sees;
    none with --device cpu."""
    if device == "cpu":
        return []
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []


def replica_envs(num_replicas: int, device: str | None,
                 gpus: list[str] | None = None) -> list[dict[str, str]]:
    """Each replica's environment: the visible GPUs split into `num_replicas` equal groups
    (CUDA_VISIBLE_DEVICES), or nothing on the CPU."""
    if num_replicas < 1:
        raise RuntimeError(f"--replicas must be at least 1, got {num_replicas}")
    if num_replicas == 1 and gpus is None:
        return [{}]  # the one replica sees what this process sees
    gpus = visible_gpus(device) if gpus is None else gpus
    if not gpus:
        return [{} for _ in range(num_replicas)]
    if len(gpus) < num_replicas:
        raise RuntimeError(f"--replicas {num_replicas} needs at least {num_replicas} GPUs; "
                           f"{len(gpus)} are visible ({','.join(gpus)})")
    per = len(gpus) // num_replicas
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])}
            for i in range(num_replicas)]


def frontend_security_args(args, data_dir: str) -> list[str]:
    """Auth (the admin key made at first start goes to <data-dir>/admin.key, mode 0600,
    where the CLI reads it), adapter roots (default: the user's home) and TLS."""
    out = ["--no-auth"] if args.no_auth else [
        "--admin-key-file", os.path.join(data_dir, "admin.key")]
    for root in args.adapter_roots or [os.path.expanduser("~")]:
        out += ["--adapter-roots", os.path.abspath(os.path.expanduser(root))]
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, flag, None):
            out += [f"--{flag.replace('_', '-')}", os.path.abspath(getattr(args, flag))]
    return out


def up(args) -> int:
    try:
        for port in (args.port, getattr(args, "http_port", -1)):
            if port > 0:
                check_port_free(args.host, port)
    except RuntimeError as e:
        print(f"slora up: {e}", file=sys.stderr, flush=True)
        return 1
    model = args.model
    if model is None:
        from slora.models.gguf_convert import ensure_default_model

        model = ensure_default_model(os.path.expanduser(args.data_dir))
    try:
        children = build_children(args, model)
    except RuntimeError as e:
        print(f"slora up: {e}", file=sys.stderr, flush=True)
        return 1
    by_name = {c.name: c for c in children}

    def on_ready() -> None:
        frontend = by_name["frontend"]
        say(f"slora is serving {os.path.basename(model)} on {args.host}:{frontend.port}"
            f"  (Ctrl-C stops it)")
        if frontend.http_port >= 0:
            scheme = "https" if args.tls_cert else "http"
            say(f"slora: OpenAI API at {scheme}://{args.host}:{frontend.http_port}/v1")
        say("slora: AUTH IS OFF (--no-auth): anyone reaching the port may use it" if args.no_auth
            else "slora: calls need an API key; the admin key is in "
            f"{os.path.join(os.path.abspath(os.path.expanduser(args.data_dir)), 'admin.key')}"
            " (the slora CLI reads it; `slora keys create TENANT` makes tenant keys)")
        say("slora: Prometheus metrics at " + ", ".join(
            f"{c.name} http://127.0.0.1:{c.metrics_port}/metrics" for c in children
            if c.metrics_port > 0))

    return supervise(children, args.start_timeout, "slora up", on_ready)


def supervise(children: list[Child], start_timeout: float, who: str, on_ready=None) -> int:
    """Starts the children in order, calls `on_ready()`, restarts any that dies, and on
    Ctrl-C or SIGTERM stops them all, last started first, each draining; a second Ctrl-C
    kills them all at once. Returns the exit status."""
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            say(DRAINING_LINE)
            return
        say("slora: stopping now")
        for child in children:
            child.kill(wait=False)
        for child in children:
            child.kill()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for child in children:
            if stopping.is_set():
                return 0
            child.start(start_timeout)
        if on_ready is not None:
            on_ready()
        while not stopping.wait(0.5):
            for child in children:
                child.check_health()
                if not child.alive() and not stopping.is_set():
                    child.restarts += 1
                    say(f"slora: {child.name} exited (code {child.proc.returncode}); "
                        f"restarting it (restart {child.restarts})")
                    child.start(start_timeout)
    except RuntimeError as e:
        print(f"{who}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        say("slora: stopped")
    return 0
