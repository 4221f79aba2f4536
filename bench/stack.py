"""The services of the serving benchmark as child processes on loopback: the embedded Redis,
the worker (bench/dummy_worker.py: dummy weights, dummy adapters made in host memory), the
scheduler and the frontend, each a real entry point started with this interpreter. Each one
prints `SLORA_READY <name> port=N` when it serves; their output goes to one log file, each
line tagged with its process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from slora.adapter_store.embedded_redis import PASSWORD_FILE, url_with_password
from slora.bench import driver
from slora.bench.workload import seed_registry
from slora.common.internal_auth import SECRET_FILE_NAME, call_metadata, load_or_create_secret
from slora.common.lifecycle import python_module_command

READY_PREFIX = "SLORA_READY"
START_TIMEOUT_S = 600.0
"""A worker may build kernels and capture CUDA graphs before it is ready."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Stack:
    """The services as child processes on loopback; their output goes to one log file."""

    def __init__(self, log_path: str):
        self.log = open(log_path, "w", buffering=1)
        self.log_lock = threading.Lock()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.ports: dict[str, int] = {}
        self.secret_file = ""
        """The deployment's internal secret (start_stack sets it)."""
        self.redis_password_file = ""

    def start(self, name: str, module: str, *args: str) -> int:
        """Runs `python -m module args`; waits for its SLORA_READY line; returns its port."""
        cmd = python_module_command(module, *args)
        self._write(name, "$ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append((name, proc))
        ready = threading.Event()
        port = [0]

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(READY_PREFIX) and not ready.is_set():
                    fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
                    port[0] = int(fields.get("port", 0))
                    ready.set()
                self._write(name, line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {proc.returncode}" if proc.poll() is not None
                       else f"not ready after {START_TIMEOUT_S:.0f} s")
                raise RuntimeError(f"{name} {why}; its output is in {self.log.name}:\n"
                                   + self.tail(name))
        self.ports[name] = port[0]
        log(f"{name} ready on port {port[0]}")
        return port[0]

    def _write(self, name: str, line: str) -> None:
        with self.log_lock:
            self.log.write(f"[{name}] {line}\n")

    def tail(self, name: str, num_lines: int = 30) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            lines = [ln for ln in f if ln.startswith(f"[{name}]")]
        return "".join(lines[-num_lines:])

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        self.log.close()

    def cpu_seconds(self) -> dict[str, float]:
        """Each running service's CPU time so far (user + system, its threads included;
        a tensor-parallel worker's ranks are its children and are not counted), from
        /proc/<pid>/stat; {} where there is no /proc."""
        out = {}
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        for name, proc in self.procs:
            try:
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return out

    def stats(self) -> dict:
        import grpc

        from slora.v1 import scheduler_pb2, scheduler_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.ports['scheduler']}") as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            secret = call_metadata(load_or_create_secret(self.secret_file))
            return dict(stub.Stats(scheduler_pb2.StatsRequest(), timeout=10,
                                   metadata=secret).values)


def start_stack(stack: Stack, work_dir: str, worker_args: list[str], ranks) -> str:
    """Starts Redis, the worker, the scheduler and the frontend, with the deployment's
    internal secret in <work_dir>/internal.secret; returns the frontend's address."""
    redis_dir = os.path.join(work_dir, "redis")
    stack.redis_password_file = os.path.join(redis_dir, PASSWORD_FILE)
    stack.secret_file = os.path.join(work_dir, SECRET_FILE_NAME)
    secret = ["--internal-secret-file", stack.secret_file]
    redis_port = stack.start("redis", "slora.adapter_store.embedded_redis",
                             "--data-dir", redis_dir)
    worker_port = stack.start("worker", "slora.bench.dummy_worker",
                              "--dummy-ranks", ",".join(map(str, sorted(set(ranks)))),
                              "--port", "0", *secret, *worker_args)
    scheduler_port = stack.start("scheduler", "slora.scheduler.server", "--port", "0",
                                 *secret, "--worker-address", f"127.0.0.1:{worker_port}")
    frontend_args = ["--port", "0", "--scheduler-address", f"127.0.0.1:{scheduler_port}",
                     "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
                     "--redis-password-file", stack.redis_password_file, *secret,
                     "--data-dir", os.path.join(work_dir, "data")]
    frontend_port = stack.start("frontend", "slora.frontend.server",
                                *frontend_args, *_no_auth_flag(frontend_args))
    return f"127.0.0.1:{frontend_port}"


def _no_auth_flag(frontend_args: list[str]) -> list[str]:
    """["--no-auth"] where the frontend has API keys to turn off (the benchmark calls as the
    one anonymous tenant), else []."""
    from slora.frontend.server import build_parser

    _, unknown = build_parser().parse_known_args(frontend_args + ["--no-auth"])
    return [] if "--no-auth" in unknown else ["--no-auth"]


def register_adapters(stack: Stack, target: str, model, adapters, mode: str,
                      peft_paths: dict[str, str] | None, dtype_size: int) -> None:
    """host mode: records straight into the registry's Redis; peft mode: each PEFT folder
    uploaded through the API (Adapters.Upload: the frontend validates and stores it), as a
    client on another machine would register it."""
    start = time.perf_counter()
    if mode == "host":
        with open(stack.redis_password_file) as f:
            url = url_with_password("127.0.0.1", stack.ports["redis"], f.read().strip())
        seed_registry(url, model, adapters, dtype_size)
    else:
        from slora.client import Client

        progress = driver.Progress(len(adapters), "uploading PEFT folders")
        with Client(target, timeout_s=600) as client:
            for a in adapters:
                client.upload_adapter(a.adapter_id, peft_paths[a.adapter_id])
                progress.update()
        progress.close()
    log(f"registered {len(adapters)} adapters ({mode} mode) in "
        f"{time.perf_counter() - start:.1f} s")
