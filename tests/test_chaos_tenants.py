"""Chaos between tenants (real processes, auth on): while three tenants stream with their own
adapters and ordinary sampling, a fourth sends the worst values the API accepts (and the
fuzzer's random sampling parameters, and invalid ones) as fast as it is answered. No stream
of the other tenants fails, no answer is UNKNOWN or INTERNAL, and the pool is idle after.

The CPU suite runs it for CHAOS_S = 30 s; the long run is the same test for 10 minutes:

    SLORA_CHAOS_S=600 python -m pytest -s tests/test_chaos_tenants.py | grep FIGURE
"""
from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import time
import warnings

import grpc
import pytest

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_stack import Stack, stream_outcome, worker_argv
from helpers_strategies import sampling_params
from slora.v1 import common_pb2, generation_pb2, generation_pb2_grpc

CHAOS_S = float(os.environ.get("SLORA_CHAOS_S", "30"))
VICTIMS = ("acme", "bravo", "charlie")
STREAMS_PER_VICTIM = 3
ATTACK_LOOPS = 4
VOCAB = 256
"""make_tiny_llama's vocabulary."""
EXTREME_FLOATS = [5e-324, 1e-300, 1e-46, 1e-39, 1e-30, 1e-6, 1.0, 99.99999, 100.0]
EXTREME_INTS = [0, 1, 2, VOCAB - 1, VOCAB, 2**31 - 1, 2**32 - 1]
EXTREME_SEEDS = [None, 0, 1, 2**63 - 1]
ATTACKER_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
"""What the attacker may get: its extreme values are served, its invalid ones refused."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-tenants")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=49)
    stack = Stack(str(root), base, worker_argv(base, max_model_len=128, max_num_seqs=32),
                  adapter_roots=[str(root)],
                  frontend_args=["--max-requests-per-tenant", "0"]).start_all()
    paths = [make_peft_adapter(base, str(root / f"ad-{i}"), r=2 << (i % 3),
                               target_modules=[["q_proj", "v_proj"], "all-linear"][i % 2],
                               seed=i) for i in range(4)]
    from slora.client import Client

    with stack.client() as admin:
        stack.keys = {t: admin.create_key(t).secret for t in (*VICTIMS, "mallory")}
    for i, tenant in enumerate((*VICTIMS, "mallory")):
        with Client(stack.address, api_key=stack.keys[tenant], timeout_s=60) as c:
            c.register_adapter(f"{tenant}-ft", paths[i])
    yield stack
    stack.stop_all()


def metadata(stack: Stack, tenant: str):
    return (("authorization", f"Bearer {stack.keys[tenant]}"),)


def victim_request(rng: random.Random, tenant: str) -> generation_pb2.GenerateRequest:
    """An ordinary request: greedy or sampled, its own adapter or the base."""
    sampling = common_pb2.SamplingParams(max_new_tokens=rng.randint(4, 40), ignore_eos=True)
    if rng.random() < 0.5:
        sampling.temperature, sampling.top_p = rng.uniform(0.3, 1.5), rng.uniform(0.5, 1.0)
        sampling.top_k, sampling.seed = rng.choice([0, 5, 50]), rng.randrange(1 << 32)
    return generation_pb2.GenerateRequest(
        adapter_id=rng.choice([f"{tenant}-ft", ""]),
        prompt_token_ids=generation_pb2.TokenIds(
            ids=[rng.randrange(VOCAB) for _ in range(rng.randint(1, 60))]),
        sampling=sampling)


def fuzzer_sampling(num: int) -> list[common_pb2.SamplingParams]:
    """`num` draws of the fuzz suite's sampling strategy (helpers_strategies.py)."""
    strategy = sampling_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [strategy.example() for _ in range(num)]


def attack_request(rng: random.Random, fuzzed: list) -> generation_pb2.GenerateRequest:
    """The worst values the API accepts, now and then a fuzzer draw or one past a limit."""
    if rng.random() < 0.25:
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(rng.choice(fuzzed))
        sampling.max_new_tokens = min(sampling.max_new_tokens, 8)
    else:
        sampling = common_pb2.SamplingParams(
            max_new_tokens=rng.choice([1, 2, 3, 8]),
            temperature=rng.choice(EXTREME_FLOATS + [0.0]),
            top_p=rng.choice(EXTREME_FLOATS[:-2] + [1.0]),
            top_k=rng.choice(EXTREME_INTS), ignore_eos=rng.random() < 0.5,
            stop_token_ids=rng.sample(range(VOCAB), rng.choice([0, 1, 64])))
        seed = rng.choice(EXTREME_SEEDS)
        if seed is not None:
            sampling.seed = seed
        if rng.random() < 0.1:  # one past a limit: refused, never served wrongly
            sampling.temperature = rng.choice([100.0001, -1e-300, math.nan, math.inf])
    prompt = rng.choice([[VOCAB - 1], [0] * 127, [rng.randrange(VOCAB) for _ in range(16)],
                         [VOCAB - 1] * 64])
    return generation_pb2.GenerateRequest(
        adapter_id=rng.choice(["", "mallory-ft"]), sampling=sampling,
        prompt_token_ids=generation_pb2.TokenIds(ids=prompt))


async def chaos(stack: Stack, seconds: float):
    fuzzed = fuzzer_sampling(200)
    victims: collections.Counter = collections.Counter()
    failures = []
    attacks: collections.Counter = collections.Counter()
    odd_attacks = []
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def victim(tenant: str, i: int):
            rng = random.Random(f"{tenant}-{i}")
            while time.monotonic() < end:
                req = victim_request(rng, tenant)
                o = await stream_outcome(stub, req, metadata=metadata(stack, tenant),
                                         timeout=120)
                victims["streams"] += 1
                victims["tokens"] += len(o.token_ids)
                if o.code != grpc.StatusCode.OK or \
                        len(o.token_ids) != req.sampling.max_new_tokens:
                    failures.append((tenant, o.code.name, o.details, str(req)[:300]))

        async def attacker(i: int):
            rng = random.Random(f"mallory-{i}")
            while time.monotonic() < end:
                req = attack_request(rng, fuzzed)
                o = await stream_outcome(stub, req, metadata=metadata(stack, "mallory"),
                                         timeout=120)
                attacks[o.code.name] += 1
                if o.code not in ATTACKER_OK:
                    odd_attacks.append((o.code.name, o.details, str(req)[:300]))

        start = time.monotonic()
        await asyncio.gather(*(victim(t, i) for t in VICTIMS for i in range(STREAMS_PER_VICTIM)),
                             *(attacker(i) for i in range(ATTACK_LOOPS)))
        return victims, failures, attacks, odd_attacks, time.monotonic() - start


def test_one_tenants_worst_sampling_values_fail_no_other_tenants_stream(stack):
    """CHAOS_S seconds of three tenants streaming (9 at once) beside a fourth sending the
    worst accepted sampling values, fuzzer draws and invalid values (4 at once): 0 victim
    streams fail or come short, the attacker gets only OK or INVALID_ARGUMENT, every
    process lives and the pool is idle afterwards."""
    victims, failures, attacks, odd_attacks, seconds = asyncio.run(chaos(stack, CHAOS_S))
    idle = stack.wait_pool_idle(timeout_s=30)
    print(f"FIGURE chaos between tenants: ran (s): {seconds:.0f}")
    print(f"FIGURE chaos between tenants: victim streams / tokens / failed: "
          f"{victims['streams']} / {victims['tokens']} / {len(failures)}")
    print(f"FIGURE chaos between tenants: attacker answers by code: {dict(attacks)}")
    print(f"FIGURE chaos between tenants: pool after: kv pages {idle['pages_kv']}, running "
          f"{idle['num_running']}, waiting {idle['num_waiting']}")
    assert failures == [], failures[:5]
    assert odd_attacks == [], odd_attacks[:5]
    assert victims["streams"] >= 10 and attacks["OK"] >= 10, (victims, attacks)
    for name in ("redis", "worker", "scheduler", "frontend"):
        assert stack.alive(name), f"{name} died"
    assert idle["pages_kv"] == 0 and idle["num_running"] == 0 and idle["num_waiting"] == 0, idle
