"""One tenant's requests cannot end another tenant's streams (real processes on loopback,
auth on, three tenants): the worst sampling values the API accepts, and an adapter whose
files break after registration, fail (at most) their own requests; the other tenants'
streams run to their end and their adapters stay resident."""
from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_stack import Stack, stream_outcome, streams_past_first_token, worker_argv
from slora.v1 import common_pb2, generation_pb2, generation_pb2_grpc

WORST_SAMPLING = [
    dict(temperature=5e-324), dict(temperature=1e-300), dict(temperature=1e-39),
    dict(temperature=1e-39, top_p=1e-46), dict(temperature=1.0, top_p=5e-324),
    dict(temperature=1e-30, top_k=1), dict(temperature=100.0, top_k=2**32 - 1),
    dict(temperature=100.0, top_p=1e-46, seed=2**63 - 1), dict(temperature=1e-39, seed=0),
]
"""Each accepted by validation; on main the first four end every stream of the batch."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=41)
    stack = Stack(str(root), base, worker_argv(base, max_model_len=128),
                  adapter_roots=[str(root)]).start_all()
    stack.adapter_paths = [make_peft_adapter(base, str(root / f"ad-{i}"), r=4, seed=i)
                           for i in range(2)]
    with stack.client() as admin:
        stack.keys = {t: admin.create_key(t).secret for t in ("acme", "bravo", "mallory")}
    yield stack
    stack.stop_all()


def tenant_metadata(stack: Stack, tenant: str):
    return (("authorization", f"Bearer {stack.keys[tenant]}"),)


def request(prompt: list[int], max_new_tokens: int, adapter_id: str = "", **sampling):
    return generation_pb2.GenerateRequest(
        adapter_id=adapter_id, prompt_token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True,
                                           **sampling))


async def victims_and_attacker(stack: Stack, victim_requests, attacker_requests):
    """Starts the victims' streams; once each has its first token, sends the attacker's
    requests; returns (victim outcomes, attacker outcomes)."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        victims = await streams_past_first_token(
            stub, [(r, tenant_metadata(stack, tenant)) for tenant, r in victim_requests])
        attacks = await asyncio.gather(*(stream_outcome(
            stub, r, metadata=tenant_metadata(stack, "mallory"), timeout=120)
            for r in attacker_requests))
        return await asyncio.gather(*victims), attacks


def test_worst_accepted_sampling_values_end_no_other_stream(stack):
    """Eight streams of two tenants run while a third sends two-token requests with every
    extreme temperature, top_p, top_k and seed the API accepts: all eight finish with
    their 40 tokens, and each extreme request is answered OK with its tokens (sampling
    is total)."""
    victims = [("acme" if i % 2 else "bravo", request([5 + i, 6, 7], 40)) for i in range(8)]
    attacks = [request([9, 8, 7], 2, **s) for s in WORST_SAMPLING for _ in range(2)]
    victim_outcomes, attack_outcomes = asyncio.run(
        victims_and_attacker(stack, victims, attacks))
    for o in victim_outcomes:
        assert o.code == grpc.StatusCode.OK and len(o.token_ids) == 40, o
    for s, o in zip([s for s in WORST_SAMPLING for _ in range(2)], attack_outcomes):
        assert o.code == grpc.StatusCode.OK and len(o.token_ids) == 2, (s, o)
    idle = stack.wait_pool_idle()
    assert idle["pages_kv"] == 0 and idle["num_running"] == 0, idle


def store_copy(stack: Stack, client, adapter_id: str) -> str:
    """The adapter store's copy of a registered adapter's weights (what the worker reads)."""
    sha = client.get_adapter(adapter_id).sha256
    return os.path.join(stack.root, "data", "adapters", sha, "adapter_model.safetensors")


def test_an_adapter_broken_after_registration_fails_only_its_requests(stack):
    """Tenant acme streams with its adapter (resident); mallory registers another adapter,
    then its weights in the store break before its first use. Mallory's requests end with
    an error naming the adapter; acme's streams get all their tokens, and acme's adapter is
    never reloaded (its slot was not emptied)."""
    from slora.client import Client

    with Client(stack.address, api_key=stack.keys["acme"], timeout_s=60) as acme:
        acme.register_adapter("acme-ft", stack.adapter_paths[0])
        acme.generate([3, 4, 5], adapter_id="acme-ft", max_new_tokens=2)
    with Client(stack.address, api_key=stack.keys["mallory"], timeout_s=60) as mallory:
        mallory.register_adapter("fragile", stack.adapter_paths[1])
        weights = store_copy(stack, mallory, "fragile")
    os.chmod(weights, 0o644)
    with open(weights, "wb") as f:
        f.write(b"not safetensors any more")

    victims = [("acme", request([5 + i, 6, 7], 40, adapter_id="acme-ft")) for i in range(6)]
    attacks = [request([9, 8, 7], 4, adapter_id="fragile") for _ in range(3)]
    victim_outcomes, attack_outcomes = asyncio.run(
        victims_and_attacker(stack, victims, attacks))
    for o in victim_outcomes:
        assert o.code == grpc.StatusCode.OK and len(o.token_ids) == 40, o
    for o in attack_outcomes:
        assert o.code == grpc.StatusCode.FAILED_PRECONDITION and "fragile" in o.details, o
    stack.wait_pool_idle()
    loads = [line for line in stack.log_lines("worker") if line.get("msg") == "adapter loaded"]
    acme_loads = [line for line in loads if line.get("adapter_id", "").endswith("/acme-ft")]
    assert len(acme_loads) == 1, f"acme-ft loaded {len(acme_loads)} times: {loads}"
