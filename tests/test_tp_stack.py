"""Tensor parallelism through the whole stack: `slora up --tensor-parallel-size 2 --device
cpu` on SmolLM2-135M-Instruct (its 3 KV groups cut 2 and 1 over the ranks) answers the README's
question; kill -9 of rank 1 mid-stream ends every stream with UNAVAILABLE within 5 s and the
group serves again once `slora up` has restarted it; a rank stopped with SIGSTOP (hung, not
dead) is found by the collective timeout, within 30 s, and the group is restarted likewise.
Each test prints the figures docs/RELIABILITY.md quotes (`pytest -s ... | grep FIGURE`)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import grpc
import pytest

from helpers_stack import PROCESS_ENV
from helpers_up import SloraUp, signal_mid_stream, wait_serving
from slora.client import Client
from slora.common.errors import ConfigError
from test_chaos import figure

RANK_LINE = re.compile(r"^\[worker\] SLORA_TP_RANK rank=(\d+) pid=(\d+)")
QUESTION = "What is the capital of France?"
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def smollm2_tp2(tmp_path_factory):
    from slora.models.gguf_convert import ensure_default_model, find_smollm2_gguf
    try:
        find_smollm2_gguf()
    except ConfigError as e:
        pytest.skip(str(e))
    data_dir = tmp_path_factory.mktemp("tp-stack")
    model = ensure_default_model(str(data_dir), progress=lambda message: None)
    up = SloraUp(str(data_dir), model, "--tensor-parallel-size", "2", "--max-lora-rank", "8",
                 "--start-timeout", str(START_TIMEOUT_S))
    try:
        yield wait_serving(up, START_TIMEOUT_S)
    finally:
        up.stop()


def rank_pid(up: SloraUp, rank: int, newer_than: int = -1) -> tuple[int, int]:
    """(line index, pid) of the latest start of tensor-parallel rank `rank`."""
    def found():
        for i in range(len(up.lines) - 1, newer_than, -1):
            match = RANK_LINE.match(up.lines[i])
            if match and int(match.group(1)) == rank:
                return i, int(match.group(2))
    return up.wait_for(found, f"rank {rank} line", START_TIMEOUT_S)


def serves_again(up: SloraUp, worker_index: int) -> float:
    """Waits for the restarted worker group and a request through it; returns when it
    answered (time.monotonic())."""
    up.child("worker", newer_than=worker_index)
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(up.address, api_key=up.api_key, timeout_s=60) as c:
                out = c.generate([5, 6, 7], max_new_tokens=5, ignore_eos=True)
            assert len(out.token_ids) == 5
            return time.monotonic()
        except Exception:  # the scheduler has not reconnected yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_tp2_smollm2_answers_paris(smollm2_tp2):
    """`slora generate --chat` through the TP = 2 worker gives the answer the README
    promises on one process."""
    up = smollm2_tp2
    env = {**os.environ, **PROCESS_ENV, "SLORA_ADDRESS": up.address,
           "SLORA_API_KEY": up.api_key}
    gen = subprocess.run(["slora", "generate", "--chat", QUESTION], env=env,
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == "The capital of France is Paris.", gen.stdout


def _stop_rank_mid_stream(up: SloraUp, sig: int):
    index, _ = up.child("worker")
    _, pid = rank_pid(up, 1)
    try:
        outcomes, seconds = asyncio.run(signal_mid_stream(up, pid, sig, end_within_s=60))
    finally:
        if sig == signal.SIGSTOP:  # rank 0 kills it; make sure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    killed_at = time.monotonic() - seconds
    for o in outcomes:
        assert o.code == grpc.StatusCode.UNAVAILABLE and "worker" in o.details, o
    back_s = serves_again(up, index) - killed_at
    return seconds, back_s


def test_rank1_killed_mid_stream_ends_streams_unavailable_and_the_group_restarts(smollm2_tp2):
    seconds, back_s = _stop_rank_mid_stream(smollm2_tp2, signal.SIGKILL)
    assert seconds < 5.0, f"streams ended {seconds:.2f} s after rank 1 was killed"
    figure("TP=2 rank 1 kill -9: last stream ended with UNAVAILABLE after (s)", round(seconds, 3))
    figure("TP=2 rank 1 kill -9: group serving again after (s)", round(back_s, 2))


def test_rank1_hung_is_detected_within_30_s_and_the_group_restarts(smollm2_tp2):
    seconds, back_s = _stop_rank_mid_stream(smollm2_tp2, signal.SIGSTOP)
    assert seconds < 30.0, f"streams ended {seconds:.2f} s after rank 1 was stopped"
    figure("TP=2 rank 1 SIGSTOP: last stream ended with UNAVAILABLE after (s)", round(seconds, 2))
    figure("TP=2 rank 1 SIGSTOP: group serving again after (s)", round(back_s, 2))


def test_a_rank_that_cannot_start_fails_the_group_at_once(tmp_path, monkeypatch):
    """A follower whose Python cannot even start (a broken install: PYTHONHOME points
    nowhere, for the children only) fails rank 0's start with TensorParallelGroupError
    naming the rank and its exit code, well before the rendezvous timeout."""
    from helpers_peft import make_tiny_llama
    from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
    from slora.common.errors import TensorParallelGroupError
    from slora.engine.engine import Engine
    from slora.models.registry import model_config_from_folder

    base = make_tiny_llama(str(tmp_path / "base"), num_kv_heads=2)
    config = EngineConfig(model=model_config_from_folder(base), pool=PoolConfig(num_pages=4096),
                          scheduler=SchedulerConfig(max_model_len=128), tensor_parallel_size=2)
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "nowhere"))
    start = time.monotonic()
    with pytest.raises(TensorParallelGroupError, match="rank 1 exited with code"):
        Engine(config, base)
    assert time.monotonic() - start < 60
