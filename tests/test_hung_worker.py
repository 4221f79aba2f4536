"""A hung worker (SIGSTOP, with streams running) under `slora up`: the scheduler sees a step
far past its expected time, ends the streams with UNAVAILABLE and says NOT_SERVING; the
launcher finds the worker's health unanswered, kills it and restarts it; serving resumes.
Prints the figures docs/RELIABILITY.md quotes (`pytest -s ... | grep FIGURE`)."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
from grpc_health.v1 import health_pb2

from helpers_peft import make_tiny_llama
from helpers_up import frontend_health, signal_mid_stream, start_slora_up
from slora.client import Client

SERVING = health_pb2.HealthCheckResponse.SERVING
HUNG_STEP_FLOOR_S = 3.0
DETECTION_LIMIT_S = 30.0


def test_a_stopped_worker_is_found_hung_its_streams_end_and_it_is_restarted(tmp_path):
    """SIGSTOP of the worker while 4 streams run (the scheduler's hung-step floor 3 s):
    every stream ends UNAVAILABLE naming the hung worker within 30 s, the frontend's health
    is NOT_SERVING, `slora up` kills and restarts the worker, health is SERVING again and a
    new request gets its tokens."""
    base = make_tiny_llama(str(tmp_path / "base"), num_kv_heads=2, seed=45)
    up = start_slora_up(str(tmp_path / "data"), base,
                        "--hung-step-floor-s", str(HUNG_STEP_FLOOR_S))
    pid = None
    try:
        index, worker = up.child("worker")
        pid = worker["pid"]
        outcomes, ended_s = asyncio.run(signal_mid_stream(
            up, pid, signal.SIGSTOP, end_within_s=DETECTION_LIMIT_S + 30))
        stopped_at = time.monotonic() - ended_s
        for o in outcomes:
            assert o.code == grpc.StatusCode.UNAVAILABLE and "hung" in o.details, o
        assert ended_s < DETECTION_LIMIT_S, f"streams ended {ended_s:.1f} s after SIGSTOP"
        health_during = frontend_health(up.address)
        up.child("worker", newer_than=index)
        restarted_s = time.monotonic() - stopped_at
        while frontend_health(up.address) != SERVING:
            assert time.monotonic() - stopped_at < 120, "the frontend never served again"
            time.sleep(0.05)
        serving_s = time.monotonic() - stopped_at
        with Client(up.address, api_key=up.api_key, timeout_s=60) as c:
            assert len(c.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        up.stop()
    assert health_during != SERVING or restarted_s < ended_s, health_during
    assert any("hung" in line and "killing it" in line for line in up.lines), up.lines[-20:]
    print(f"FIGURE hung worker (SIGSTOP): streams ended UNAVAILABLE after (s): {ended_s:.2f}")
    print(f"FIGURE hung worker (SIGSTOP): restarted by slora up after (s): {restarted_s:.2f}")
    print(f"FIGURE hung worker (SIGSTOP): frontend SERVING again after (s): {serving_s:.2f}")
