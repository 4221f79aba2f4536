"""`slora up` (client/launcher.py) as a child process of a test, on the tiny model: its
output lines, and the ports and pids its children print on their ready lines."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers_procs import slora_module
from helpers_stack import PROCESS_ENV, generate_request, streams_past_first_token
from slora.v1 import generation_pb2_grpc

READY_LINE = re.compile(r"^\[(\w+)\] SLORA_READY \w+ (.*)$")
FIELD = re.compile(r"(\w+)=(\d+)")


class SloraUp:
    """`slora up` (client/launcher.py) on the tiny model, with its output lines and the
    ports and pids its children print on their ready lines."""

    def __init__(self, data_dir: str, base: str, *extra_args: str):
        """`extra_args`: more `slora up` flags (--tensor-parallel-size, --hung-step-floor-s)."""
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            slora_module("slora.client.cli", "up", "--model", base, "--data-dir", data_dir,
                         "--port", "0", "--http-port", "0", "--device", "cpu",
                         "--dtype", "float32",
                         "--max-model-len", "512", "--num-pages", "4096",
                         "--max-lora-rank", "16", "--start-timeout", "120", *extra_args),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **PROCESS_ENV})
        self.lines: list[str] = []
        self.children: dict[str, tuple[int, dict[str, int]]] = {}
        """name -> (index of its last ready line, {port, metrics_port, pid})."""
        self.pids: set[int] = set()
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._changed:
                match = READY_LINE.match(line)
                if match:
                    fields = {k: int(v) for k, v in FIELD.findall(match.group(2))}
                    self.children[match.group(1)] = (len(self.lines), fields)
                    self.pids.add(fields.get("pid", 0))
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, done, what: str, timeout_s: float = 180.0):
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not (result := done()):
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (
                    f"slora up: no {what}; its output ends with:\n" + "\n".join(self.lines[-40:]))
                self._changed.wait(min(left, 1.0))
            return result

    def child(self, name: str, newer_than: int = -1) -> tuple[int, dict[str, int]]:
        """The child's ready line (index, fields), waiting for one after index `newer_than`."""
        def found():
            entry = self.children.get(name)
            return entry if entry and entry[0] > newer_than else None
        return self.wait_for(found, f"ready line of {name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids - {0}:  # a child the launcher could not stop
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_serving(up: SloraUp, timeout_s: float = 180.0) -> SloraUp:
    """Waits for `slora up` to serve; sets up.address, up.api_key and up.metadata."""
    def serving():
        for line in up.lines:
            match = re.search(r"slora is serving .* on 127\.0\.0\.1:(\d+)", line)
            if match:
                return match.group(1)
    up.address = f"127.0.0.1:{up.wait_for(serving, 'serving line', timeout_s)}"
    with open(os.path.join(up.data_dir, "admin.key")) as f:
        up.api_key = f.read().strip()
    up.metadata = (("authorization", f"Bearer {up.api_key}"),)
    return up


def start_slora_up(data_dir: str, base: str, *extra_args: str) -> SloraUp:
    """`slora up` serving (wait_serving), stopped again if it does not get there."""
    up = SloraUp(data_dir, base, *extra_args)
    try:
        return wait_serving(up)
    except BaseException:
        up.stop()
        raise


def frontend_health(address: str, service: str = "") -> int:
    """The health status at `address`, or -1 when it does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return -1


async def signal_mid_stream(up: SloraUp, pid: int, sig: int, num_streams: int = 4,
                            end_within_s: float = 30.0):
    """Starts long streams; once each has a token, sends `sig` to `pid`; returns the
    outcomes and the seconds from the signal to the end of the last stream (each must end
    within `end_within_s`)."""
    async with grpc.aio.insecure_channel(up.address) as channel:
        streams = await streams_past_first_token(
            generation_pb2_grpc.GenerationStub(channel),
            [(generate_request([5, i, 9], 400), up.metadata) for i in range(num_streams)])
        signalled_at = time.monotonic()
        os.kill(pid, sig)
        outcomes = await asyncio.wait_for(asyncio.gather(*streams), end_within_s)
        return outcomes, time.monotonic() - signalled_at
