"""A hung worker ends itself (worker/liveness.py, --hung-step-exit-s), so that a supervisor
restarting only processes that exit (compose's `restart:`, systemd) restarts it: the health
loop of a real process, in a step that never returns (the step thread blocked, Python free to
run), and wedged in C code that holds the GIL (no Python runs at all: faulthandler's timer)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from slora.worker.liveness import EXIT_HUNG

PROGRAM = textwrap.dedent("""
    import asyncio, re, sys, threading, time
    from slora.common.lifecycle import HealthServicer
    from slora.worker.liveness import StepWatch, keep_health

    how, exit_after_s, wait_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    watch = StepWatch(hung_step_s=0.5, exit_after_s=exit_after_s)

    def step():  # the executor thread, in one step that never returns
        watch.begin()
        if how == "blocked":
            threading.Event().wait()  # the GIL is free: the health loop runs
        else:
            re.match(r"(a+)+$", "a" * 64 + "b")  # backtracks for ages, holding the GIL

    async def main():
        servicer = HealthServicer()
        health = asyncio.create_task(keep_health(servicer, watch))
        await asyncio.sleep(0.3)
        print("STARTED", flush=True)
        threading.Thread(target=step, name="slora-step", daemon=True).start()
        await asyncio.sleep(wait_s)
        print("STILL RUNNING", flush=True)

    asyncio.run(main())
""")


def run_hung(how: str, exit_after_s: float,
             wait_s: float = 40.0) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PROGRAM, how, str(exit_after_s), str(wait_s)],
                          capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def test_a_step_past_the_exit_limit_ends_the_worker_with_its_stacks_on_stderr():
    proc, took_s = run_hung("blocked", 2.0)
    assert proc.returncode == EXIT_HUNG, (proc.returncode, proc.stderr[-2000:])
    assert "STILL RUNNING" not in proc.stdout
    assert "past --hung-step-exit-s 2" in proc.stderr and "the worker is hung" in proc.stderr
    assert "in step" in proc.stderr, proc.stderr[-2000:]  # the hung thread's stack
    assert took_s < 15, took_s


def test_a_process_wedged_holding_the_gil_ends_by_faulthandlers_timer():
    proc, took_s = run_hung("gil", 2.0)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "STILL RUNNING" not in proc.stdout
    assert "Timeout (0:00:02)!" in proc.stderr, proc.stderr[-2000:]
    assert "in step" in proc.stderr, proc.stderr[-2000:]
    assert took_s < 15, took_s


def test_without_an_exit_limit_a_hung_step_only_turns_health_not_serving():
    proc, _ = run_hung("blocked", 0.0, wait_s=4.0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STILL RUNNING" in proc.stdout


def test_a_negative_exit_limit_is_refused_by_name():
    proc = subprocess.run([sys.executable, "-P", "-m", "slora.worker.server",
                           "--hung-step-exit-s", "-1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--hung-step-exit-s" in proc.stderr and "must be >= 0" in proc.stderr
