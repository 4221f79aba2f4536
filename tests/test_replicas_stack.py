"""Many replicas behind two frontends, as real processes (helpers_replicas.py): adapter
affinity against round-robin on the same Zipf requests, every token equal to PEFT's, and a
replica killed with kill -9 in the middle of a run."""
from __future__ import annotations

import asyncio
import collections
import random
import time

import grpc
import pytest
import redis
import redis.asyncio
import torch

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_procs import stderr_tail
from helpers_replicas import Cluster
from helpers_stack import generate_request, stream_outcome, worker_argv
from slora.adapter_store.replicas import replica_key
from slora.client import Client
from slora.v1 import generation_pb2_grpc

NUM_REPLICAS = 3
NUM_ADAPTER_FILES = 30
NUM_REQUESTS = 300
ZIPF_S = 1.1
PROMPTS = [[5, 9, 14], [7, 3, 22, 8], [11, 2], [30, 31, 32, 6, 1]]
MAX_NEW = 4
CONCURRENCY = 8
TTL_S = 3.0
KILL_MAX_NEW = 40
"""Long enough outputs that streams are mid-way when the replica dies."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=4)
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # read once
    files = [make_peft_adapter(base_model, str(root / f"file-{i}"), r=[2, 4, 8][i % 3],
                               target_modules=["q_proj", "v_proj"], lora_alpha=8, seed=50 + i)
             for i in range(NUM_ADAPTER_FILES)]
    # max_num_seqs 64: a replica below 16 requests always has room (routing.ROOM_FRACTION),
    # so with 8 requests in flight no adapter moves for balance, however stale the loads
    # read from Redis are next to these 20 ms requests (real ones last seconds).
    cluster = Cluster(str(root), worker_argv(base, max_adapter_slots=16, num_pages=1024,
                                             max_num_seqs=64),
                      replica_ttl_s=TTL_S, adapter_roots=[str(root)])
    cluster.start(NUM_REPLICAS, {"fe-a": [], "fe-b": [], "fe-rr": ["--routing", "round-robin"]})
    cluster.base, cluster.files = base, files
    with Client(cluster.address("fe-a"), timeout_s=60) as client:
        for i, path in enumerate(files):
            for prefix in ("aff", "rr", "kill"):
                client.register_adapter(f"{prefix}-{i}", path)
    yield cluster
    cluster.stop_all()


class PeftOracle:
    """Greedy tokens of PEFT running each request alone with its adapter, cached."""

    def __init__(self, base: str, files: list[str]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.peft = PeftModel.from_pretrained(model, files[0], adapter_name="f0")
        for i, path in enumerate(files[1:], 1):
            self.peft.load_adapter(path, adapter_name=f"f{i}")
        self.peft.eval()
        self._cache = {}

    def tokens(self, file_index: int, prompt: list[int], n: int) -> list[int]:
        key = (file_index, tuple(prompt), n)
        if key not in self._cache:
            self.peft.set_adapter(f"f{file_index}")
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(n):
                    logits = self.peft(input_ids=torch.tensor([ids])).logits[0, -1]
                    ids.append(int(logits.argmax()))
            self._cache[key] = ids[len(prompt):]
        return self._cache[key]


def zipf_requests(seed: int = 0) -> list[tuple[int, list[int]]]:
    """(adapter file index, prompt) of each request; file i has weight 1 / (i+1)^ZIPF_S."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** ZIPF_S for i in range(NUM_ADAPTER_FILES)]
    return [(rng.choices(range(NUM_ADAPTER_FILES), weights)[0], rng.choice(PROMPTS))
            for _ in range(NUM_REQUESTS)]


async def run_requests(addresses: list[str], requests, prefix: str, max_new: int = MAX_NEW,
                       concurrency: int = CONCURRENCY, on_first_token=None):
    """Sends each request (alternating frontends), `concurrency` at a time; returns the
    Outcomes in request order."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [generation_pb2_grpc.GenerationStub(c) for c in channels]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, file_index: int, prompt: list[int]):
        async with gate:
            out = await stream_outcome(
                stubs[i % len(stubs)],
                generate_request(prompt, max_new, adapter_id=f"{prefix}-{file_index}"),
                timeout=60, on_first_token=on_first_token)
            out.ended_at = time.monotonic()
            return out

    try:
        return await asyncio.gather(*(one(i, f, p) for i, (f, p) in enumerate(requests)))
    finally:
        for channel in channels:
            await channel.close()


async def wait_gone_from_registry(url: str, replica_id: str) -> float:
    """When (time.monotonic()) the replica's entry is no longer in Redis."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        while await client.exists(replica_key(replica_id)):
            await asyncio.sleep(0.05)
        return time.monotonic()
    finally:
        await client.aclose()


def wait_for_registry(cluster: Cluster, replicas, done, timeout_s: float = 10.0):
    """The union of the replicas' GPU and host adapter sets in Redis (names as the
    schedulers know them, owner-free with auth off), once `done(gpu, host)` or after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with redis.Redis.from_url(cluster.redis_url_with_password, decode_responses=True) as r:
        while True:
            gpu = set().union(*(r.smembers(f"{replica_key(x)}:gpu") for x in replicas))
            host = set().union(*(r.smembers(f"{replica_key(x)}:host") for x in replicas))
            if done(gpu, host) or time.monotonic() > deadline:
                return gpu, host
            time.sleep(0.05)


def total_loads(cluster: Cluster, replicas) -> int:
    return sum(cluster.stats(r)["adapter_loads"] for r in replicas)


def check_peft(oracle: PeftOracle, requests, outcomes, max_new: int) -> None:
    for i, ((file_index, prompt), out) in enumerate(zip(requests, outcomes)):
        assert out.code == grpc.StatusCode.OK, f"request {i}: {out.code} {out.details}"
        assert out.token_ids == oracle.tokens(file_index, prompt, max_new), (
            f"request {i} (adapter file {file_index}, prompt {prompt}) differs from PEFT")


def test_affinity_loads_few_adapters_every_token_is_peft_and_a_killed_replica_is_survived(
        cluster):
    """Phase 1: 300 Zipf requests through two affinity frontends load each distinct adapter
    about once over the 3 replicas (<= 1.3x); phase 2: the same requests, under fresh ids of
    the same files, through a round-robin frontend load many more; every token is PEFT's.
    Phase 3: kill -9 of the busiest replica mid-run: its streams that had a token end
    UNAVAILABLE within 5 s, every other request (those queued on it, and new ones sent
    after) gets PEFT's tokens from the others, and it leaves the registry within its TTL."""
    replicas = [f"r{i}" for i in range(NUM_REPLICAS)]
    oracle = PeftOracle(cluster.base, cluster.files)
    requests = zipf_requests()
    distinct = len({f for f, _ in requests})

    before = total_loads(cluster, replicas)
    affinity = asyncio.run(run_requests(
        [cluster.address("fe-a"), cluster.address("fe-b")], requests, "aff"))
    affinity_loads = total_loads(cluster, replicas) - before
    used = {f"aff-{f}" for f, _ in requests}
    on_gpu, in_host = wait_for_registry(cluster, replicas, lambda gpu, host: used <= gpu)
    assert used <= on_gpu and on_gpu <= in_host, (used - on_gpu, on_gpu - in_host)
    rr = asyncio.run(run_requests([cluster.address("fe-rr")], requests, "rr"))
    rr_loads = total_loads(cluster, replicas) - before - affinity_loads
    print(f"\n{distinct} distinct adapters; loads: adapter-affinity {affinity_loads}, "
          f"round-robin {rr_loads}")
    check_peft(oracle, requests, affinity, MAX_NEW)
    check_peft(oracle, requests, rr, MAX_NEW)
    assert affinity_loads <= 1.3 * distinct, (affinity_loads, distinct)
    assert rr_loads > affinity_loads

    # -- phase 3: kill -9 of one replica mid-run --------------------------------------
    kill_requests = requests[:45]
    killed = {}
    started = asyncio.Event()
    num_started = collections.Counter()

    async def on_first_token():
        num_started["n"] += 1
        if num_started["n"] == 12:
            started.set()

    async def killer():
        await started.wait()
        busiest = max(replicas, key=lambda r: cluster.stats(r)["num_running"])
        killed["replica"], killed["at"] = busiest, time.monotonic()
        cluster.kill(f"scheduler-{busiest}")
        cluster.kill(f"worker-{busiest}")

    async def phase3():
        addresses = [cluster.address("fe-a"), cluster.address("fe-b")]
        run = asyncio.ensure_future(run_requests(addresses, kill_requests, "kill",
                                                 KILL_MAX_NEW, concurrency=24,
                                                 on_first_token=on_first_token))
        await killer()
        gone = asyncio.ensure_future(wait_gone_from_registry(
            cluster.redis_url_with_password, killed["replica"]))
        after = await run_requests(addresses, requests[45:75], "kill")
        return await run, after, await gone

    during, after, gone_at = asyncio.run(phase3())
    unavailable = [o for o in during if o.code == grpc.StatusCode.UNAVAILABLE]
    assert unavailable, "no stream was running on the killed replica"
    for out in unavailable:
        assert out.first_token_s is not None  # those without a token were retried
        assert out.ended_at - killed["at"] <= 5.0, out
    ok = [(req, out) for req, out in zip(kill_requests, during)
          if out.code != grpc.StatusCode.UNAVAILABLE]
    check_peft(oracle, [r for r, _ in ok], [o for _, o in ok], KILL_MAX_NEW)
    check_peft(oracle, requests[45:75], after, MAX_NEW)

    left_after = gone_at - killed["at"]
    retried = sum(stderr_tail(cluster.procs[f], 1 << 30).count("failed before the first token")
                  for f in ("fe-a", "fe-b"))
    print(f"killed {killed['replica']}: {len(unavailable)} streams ended UNAVAILABLE, "
          f"{len(ok)} of {len(during)} finished, {retried} submits retried elsewhere, "
          f"registry entry gone after {left_after:.2f} s")
    assert left_after <= TTL_S + 1.0  # the TTL runs from the last heartbeat, before the
    # kill; the second is this poll's own latency on a busy machine
