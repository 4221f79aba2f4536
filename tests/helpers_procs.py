"""Real processes for tests: start one, wait for its ready line, stop it.

Import from a test as `from helpers_procs import start_process, stop_process` (pytest puts
tests/ on sys.path). Every slora server prints one line like `SLORA_READY worker
port=NNNN` on stdout once it serves; any other program with a line that says it is ready
(and, if it listens, `port=N` on that line) works the same way.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time

from slora.common.lifecycle import python_module_command

PORT_PATTERN = re.compile(r"\bport=(\d+)")
NO_PORT = 0
"""The port `start_process` returns when the ready line names none."""


def slora_module(module: str, *args: str) -> list[str]:
    """The command line running `python -P -m <module> <args>` with this interpreter."""
    return python_module_command(module, *args)


def _pump_lines(stream, lines: queue.Queue) -> None:
    """Reads stdout to its end (so the pipe never fills), line by line."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_process(args: list[str], ready_prefix: str, timeout: float = 60.0,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """Runs `args` and waits up to `timeout` seconds for a stdout line starting with
    `ready_prefix`; returns (the process, the `port=N` of that line or NO_PORT). The
    process's stderr goes to a file, `proc.stderr_path`, quoted when it fails to start; the
    whole ready line is `proc.ready_line`."""
    stderr = tempfile.NamedTemporaryFile("w+", prefix="slora-proc-", suffix=".err",
                                         delete=False)
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    proc.stderr_path = stderr.name
    stderr.close()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump_lines, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.01)) if left > 0 else None
        except queue.Empty:
            line = None
        if line is None:
            why = (f"exited with {proc.poll()}" if proc.poll() is not None
                   else f"printed no {ready_prefix!r} line within {timeout:g} s")
            tail = stderr_tail(proc)
            stop_process(proc)
            raise RuntimeError(f"{' '.join(args)}: {why}; stderr ends with:\n{tail}")
        if line.startswith(ready_prefix):
            proc.ready_line = line.strip()
            match = PORT_PATTERN.search(line)
            return proc, int(match.group(1)) if match else NO_PORT


def stderr_tail(proc: subprocess.Popen, num_chars: int = 4000) -> str:
    """The end of what the process wrote on stderr (until stop_process removes it)."""
    try:
        # errors="replace": a line may quote a client's bytes that are not UTF-8.
        with open(proc.stderr_path, errors="replace") as f:
            return f.read()[-num_chars:]
    except FileNotFoundError:
        return ""


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; removes its stderr file; returns the
    exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if os.path.exists(proc.stderr_path):
        os.unlink(proc.stderr_path)
    return proc.returncode
