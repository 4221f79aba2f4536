"""The worker and the scheduler as real processes on loopback, driven through the internal
Scheduler API: concurrent streams give the in-process Engine's tokens; cancelled streams
free their pages; bad submissions get a clear status and the server goes on; an adapter
whose files broke ends only its own requests; a dead worker ends every stream with
UNAVAILABLE within seconds."""
from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from dataclasses import dataclass

import grpc
import pytest

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_procs import slora_module, start_process, stop_process
from slora.adapter_store import read_adapter_config
from slora.common.internal_auth import SECRET_ENV as INTERNAL_SECRET_ENV
from slora.common.internal_auth import call_metadata, send_secret
from slora.common.config import (
    EngineConfig, ModelConfig, PoolConfig, SchedulerConfig,
)
from slora.protos.model_info import engine_config_from_model_info, model_info_from_config
from slora.engine.engine import Engine
from slora.protos.convert import sampling_from_proto
from slora.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2_grpc
from slora.models.registry import dummy_model_config, model_config_from_folder

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# (rank, target modules) of the adapters a0..a9.
ADAPTER_SHAPES = [(1, ["q_proj", "v_proj"]), (2, ATTN), (4, ATTN + MLP), (8, MLP),
                  (16, ATTN + MLP), (3, ["k_proj", "o_proj"]), (6, ["q_proj", "down_proj"]),
                  (12, ATTN), (5, ATTN + MLP), (10, ["v_proj", "up_proj"])]
MAX_LORA_RANK = 16
WORKER_FLAGS = ["--device", "cpu", "--dtype", "float32", "--num-pages", "2500",
                "--max-lora-rank", MAX_LORA_RANK, "--max-adapter-slots", "6",
                "--max-model-len", "128", "--max-num-seqs", "32",
                "--max-num-batched-tokens", "96"]
START_TIMEOUT_S = 60.0


@dataclass
class Models:
    base: str
    adapters: dict[str, scheduler_pb2.AdapterRef]


@dataclass
class Stack:
    worker: object
    scheduler: object
    address: str
    """The scheduler's host:port."""
    worker_args: list[str]
    worker_port: int
    config: EngineConfig
    """The worker's, from its Info."""

    def stop(self) -> None:
        stop_process(self.scheduler)
        stop_process(self.worker)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("services")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=11)
    model = model_config_from_folder(base)
    adapters = {}
    for i, (rank, targets) in enumerate(ADAPTER_SHAPES):
        path = make_peft_adapter(base, str(root / f"a{i}"), r=rank, target_modules=targets,
                                 lora_alpha=2 * rank, seed=200 + i)
        adapters[f"a{i}"] = adapter_ref(f"a{i}", path, model)
    return Models(base, adapters)


def adapter_ref(adapter_id: str, path: str, model: ModelConfig) -> scheduler_pb2.AdapterRef:
    spec = read_adapter_config(adapter_id, path, model, MAX_LORA_RANK)
    return scheduler_pb2.AdapterRef(adapter_id=adapter_id, path=path,
                                    num_pages=spec.num_pages(model))


SECRET = secrets.token_urlsafe(32)
"""The internal secret of this module's processes (env SLORA_INTERNAL_SECRET)."""
SECRET_ENV = {INTERNAL_SECRET_ENV: SECRET}
METADATA = call_metadata(SECRET)


def scheduler_channel(address: str) -> grpc.aio.Channel:
    """A channel whose calls carry the internal secret, as the frontend's do."""
    return grpc.aio.insecure_channel(address, interceptors=send_secret(SECRET))


def start_stack(base: str, worker_flags: list, scheduler_flags: list) -> Stack:
    worker_args = slora_module("slora.worker.server", "--model", base, *worker_flags)
    worker, worker_port = start_process(worker_args, "SLORA_READY worker", START_TIMEOUT_S,
                                        env=SECRET_ENV)
    try:
        scheduler, port = start_process(
            slora_module("slora.scheduler.server", "--worker-address",
                         f"127.0.0.1:{worker_port}", *scheduler_flags),
            "SLORA_READY scheduler", START_TIMEOUT_S, env=SECRET_ENV)
    except BaseException:
        stop_process(worker)
        raise
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(f"127.0.0.1:{worker_port}") as channel:
        info = worker_pb2_grpc.WorkerStub(channel).Info(scheduler_pb2.InfoRequest(), timeout=10,
                                                        metadata=METADATA)
    return Stack(worker, scheduler, address, worker_args, worker_port,
                 engine_config_from_model_info(info))


@pytest.fixture(scope="module")
def stack(models):
    s = start_stack(models.base, WORKER_FLAGS, [])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_stack(models):
    """One request runs at a time, two may wait. The last test of this file kills and
    restarts its worker."""
    s = start_stack(models.base, ["--device", "cpu", "--num-pages", "1024",
                                  "--max-lora-rank", MAX_LORA_RANK, "--max-model-len", "512"],
                    ["--max-num-seqs", "1", "--max-queue-len", "2"])
    yield s
    s.stop()


# -- helpers ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    token_ids: list[int]
    events: list[scheduler_pb2.RequestEvent]
    code: grpc.StatusCode
    details: str = ""


async def collect(stub, request: scheduler_pb2.SubmitRequest) -> Outcome:
    tokens, events = [], []
    try:
        async for event in stub.Submit(request):
            tokens += event.token_ids
            events.append(event)
    except grpc.aio.AioRpcError as e:
        return Outcome(tokens, events, e.code(), e.details())
    return Outcome(tokens, events, grpc.StatusCode.OK)


def greedy(max_new_tokens: int, ignore_eos: bool = False, **kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, **kw)


def make_requests(models: Models, num: int, seed: int, prefix: str
                  ) -> list[scheduler_pb2.SubmitRequest]:
    """Requests cycling over no adapter and every adapter, random prompts and lengths."""
    rng = random.Random(seed)
    choices = [None] + sorted(models.adapters)
    requests = []
    for i in range(num):
        req = scheduler_pb2.SubmitRequest(
            request_id=f"{prefix}-{i}",
            prompt_token_ids=[rng.randrange(3, 256) for _ in range(rng.randint(2, 30))],
            sampling=greedy(rng.randint(4, 24)))
        adapter_id = choices[i % len(choices)]
        if adapter_id is not None:
            req.adapter.CopyFrom(models.adapters[adapter_id])
        requests.append(req)
    return requests


def engine_tokens(config: EngineConfig, models: Models,
                  requests: list[scheduler_pb2.SubmitRequest]) -> dict[str, list[int]]:
    """Each request's output tokens from the in-process Engine, all submitted at once."""
    engine = Engine(config, models.base)
    for adapter_id, ref in models.adapters.items():
        engine.add_adapter(adapter_id, ref.path)
    outputs = {}
    for r in requests:
        engine.submit(list(r.prompt_token_ids), sampling_from_proto(r.sampling),
                      r.adapter.adapter_id or None, r.request_id)
        outputs[r.request_id] = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.req_id] += out.new_token_ids
    return outputs


def describe(req: scheduler_pb2.SubmitRequest) -> str:
    return (f"{req.request_id} (adapter {req.adapter.adapter_id or 'none'}, prompt "
            f"{list(req.prompt_token_ids)})")


async def stats(stub) -> dict[str, int]:
    return dict((await stub.Stats(scheduler_pb2.StatsRequest())).values)


async def wait_for_stats(stub, done, timeout: float = 3.0) -> dict[str, int]:
    """Polls Stats until `done(values)`; returns the last values either way."""
    deadline = time.monotonic() + timeout
    while True:
        values = await stats(stub)
        if done(values) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.02)


# -- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dummy_model_config("dummy-tiny"), dummy_model_config("dummy-llama-3-8b"),
    ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                num_heads=4, num_kv_heads=1, rope_theta=5e5, eos_token_ids=(2, 7),
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 1024}, name="rs")],
    ids=["dummy-tiny", "dummy-llama-3-8b", "llama3-rope"])
def test_worker_info_carries_the_whole_engine_config(config):
    """The scheduler rebuilds exactly the worker's EngineConfig from its Info."""
    engine_config = EngineConfig(
        model=config, pool=PoolConfig(num_pages=20000, max_adapter_slots=7, max_lora_rank=32),
        scheduler=SchedulerConfig(max_num_seqs=5, max_num_batched_tokens=77,
                                  max_model_len=1000, max_queue_len=9),
        dtype="bfloat16", device="cuda:1", host_cache_bytes=123, seed=4)
    info = model_info_from_config(engine_config, None)
    assert engine_config_from_model_info(info) == engine_config


def test_scheduler_info_is_the_workers(stack, models):
    """The scheduler's Info names the worker's model folder and rebuilds its config."""
    with grpc.insecure_channel(stack.address) as channel:
        info = scheduler_pb2_grpc.SchedulerStub(channel).Info(scheduler_pb2.InfoRequest(),
                                                              timeout=10, metadata=METADATA)
    assert info.model_path == os.path.abspath(models.base)
    assert engine_config_from_model_info(info) == stack.config
    assert (info.vocab_size, info.max_model_len, info.max_lora_rank) == (256, 128, 16)


def test_concurrent_streams_give_the_in_process_engine_tokens(stack, models):
    """50 concurrent Submit streams across 10 adapters and none: each gets exactly the
    tokens the in-process Engine gives on the same config (greedy)."""
    requests = make_requests(models, 50, seed=1, prefix="mix")

    async def run():
        async with scheduler_channel(stack.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            return await asyncio.gather(*(collect(stub, r) for r in requests))

    outcomes = asyncio.run(run())
    expected = engine_tokens(stack.config, models, requests)
    for req, outcome in zip(requests, outcomes):
        assert outcome.code == grpc.StatusCode.OK, f"{describe(req)}: {outcome.details}"
        assert outcome.token_ids == expected[req.request_id], describe(req)
        last = outcome.events[-1]
        assert last.finished and last.num_output_tokens == len(outcome.token_ids)
        assert last.num_prompt_tokens == len(req.prompt_token_ids)


def test_cancelled_streams_free_their_pages(stack, models):
    """20 streams cancelled by their clients midway leave no KV page and no running
    request behind; the server goes on serving."""
    requests = make_requests(models, 20, seed=2, prefix="cancel")
    for r in requests:
        r.sampling.CopyFrom(greedy(100, ignore_eos=True))

    async def read_then_cancel(stub, request) -> int:
        call = stub.Submit(request)
        num_tokens = 0
        async for event in call:
            if event.finished:  # a starved client (loaded machine) may read too late
                return num_tokens
            num_tokens += len(event.token_ids)
            if num_tokens >= 2:
                break
        call.cancel()
        return num_tokens

    async def run():
        async with scheduler_channel(stack.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            await asyncio.gather(*(read_then_cancel(stub, r) for r in requests))
            after = await wait_for_stats(
                stub, lambda v: v["pages_kv"] == 0 and v["num_running"] == 0, timeout=15)
            again = await collect(stub, make_requests(models, 1, seed=3, prefix="after")[0])
            return after, again

    after, again = asyncio.run(run())
    assert after["pages_kv"] == 0 and after["num_running"] == 0 \
        and after["num_waiting"] == 0, after
    assert again.code == grpc.StatusCode.OK and again.events[-1].finished


# (what is wrong, how to make the request bad, status, words the message must contain)
BAD_SUBMISSIONS = [
    ("empty prompt", dict(prompt_token_ids=[]), "INVALID_ARGUMENT", "prompt is empty"),
    ("prompt too long", dict(prompt_token_ids=[5] * 128), "INVALID_ARGUMENT",
     "max_model_len is 128"),
    ("token outside the vocabulary", dict(prompt_token_ids=[5, 999]), "INVALID_ARGUMENT",
     "[999] are outside the vocabulary [0, 256)"),
    ("negative temperature", dict(sampling=dict(temperature=-1.0)), "INVALID_ARGUMENT",
     "temperature must be in [0, 100], got -1.0"),
    ("top_p above 1", dict(sampling=dict(top_p=1.5)), "INVALID_ARGUMENT",
     "top_p must be in (0, 1], got 1.5"),
    ("stop token outside the vocabulary", dict(sampling=dict(stop_token_ids=[300])),
     "INVALID_ARGUMENT", "stop_token_ids [300]"),
    ("no request id", dict(request_id=""), "INVALID_ARGUMENT", "request_id must have"),
    ("adapter without a path", dict(adapter=dict(adapter_id="x", num_pages=4)),
     "INVALID_ARGUMENT", "needs an adapter_id and a path"),
    ("adapter larger than the pool allows", dict(adapter=dict(adapter_id="x", path="/x",
                                                              num_pages=10_000)),
     "INVALID_ARGUMENT", "num_pages 10000; it must be in [1, 208]"),
]


def bad_request(i: int, change: dict) -> scheduler_pb2.SubmitRequest:
    req = scheduler_pb2.SubmitRequest(request_id=f"bad-{i}", prompt_token_ids=[5, 6, 7],
                                      sampling=greedy(4))
    for name, value in change.items():
        if name == "sampling":
            req.sampling.MergeFrom(common_pb2.SamplingParams(**value))
        elif name == "adapter":
            req.adapter.CopyFrom(scheduler_pb2.AdapterRef(**value))
        elif name == "prompt_token_ids":
            del req.prompt_token_ids[:]
            req.prompt_token_ids.extend(value)
        else:
            setattr(req, name, value)
    return req


def test_bad_submissions_get_a_clear_status_and_the_server_goes_on(stack, models):
    """Each bad submission gets its status code and a message naming the bad value; a
    request id in use gets ALREADY_EXISTS; then a good request is served."""
    async def run():
        async with scheduler_channel(stack.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            outcomes = [await collect(stub, bad_request(i, change))
                        for i, (_, change, _, _) in enumerate(BAD_SUBMISSIONS)]
            long_req = scheduler_pb2.SubmitRequest(request_id="dup", prompt_token_ids=[4, 5],
                                                   sampling=greedy(100, ignore_eos=True))
            first = stub.Submit(long_req)
            await first.read()  # it runs now
            duplicate = await collect(stub, long_req)
            first.cancel()
            good = await collect(stub, make_requests(models, 1, seed=4, prefix="good")[0])
            return outcomes, duplicate, good

    outcomes, duplicate, good = asyncio.run(run())
    for (what, _, code, words), outcome in zip(BAD_SUBMISSIONS, outcomes):
        assert outcome.code.name == code, f"{what}: {outcome.code} {outcome.details}"
        assert words in outcome.details, f"{what}: {outcome.details!r} lacks {words!r}"
    assert duplicate.code == grpc.StatusCode.ALREADY_EXISTS, duplicate
    assert "'dup' is already in use" in duplicate.details
    assert good.code == grpc.StatusCode.OK and good.events[-1].finished


def test_an_adapter_that_fails_to_load_ends_only_its_requests(stack, models, tmp_path):
    """An adapter whose weights broke after registration ends its requests with an error
    event naming it; the other requests, running beside it, get the Engine's tokens."""
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    good = models.adapters["a2"]
    for name in os.listdir(good.path):
        (broken_dir / name).write_bytes(open(os.path.join(good.path, name), "rb").read())
    (broken_dir / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    broken = scheduler_pb2.AdapterRef(adapter_id="broken", path=str(broken_dir),
                                      num_pages=good.num_pages)
    requests = make_requests(models, 12, seed=5, prefix="fail")
    broken_reqs = requests[3::4]
    for r in broken_reqs:
        r.adapter.CopyFrom(broken)
    healthy = [r for r in requests if r not in broken_reqs]

    async def run():
        async with scheduler_channel(stack.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            outcomes = await asyncio.gather(*(collect(stub, r) for r in requests))
            return outcomes, await wait_for_stats(stub, lambda v: v["pages_kv"] == 0)

    outcomes, after = asyncio.run(run())
    by_id = {r.request_id: o for r, o in zip(requests, outcomes)}
    for r in broken_reqs:
        last = by_id[r.request_id].events[-1]
        assert last.finished and last.finish_reason == common_pb2.FINISH_REASON_ERROR, last
        assert "'broken'" in last.error and "safetensors" in last.error, last.error
    expected = engine_tokens(stack.config, models, healthy)
    for r in healthy:
        assert by_id[r.request_id].code == grpc.StatusCode.OK, by_id[r.request_id].details
        assert by_id[r.request_id].token_ids == expected[r.request_id], describe(r)
    assert after["pages_kv"] == 0 and after["num_running"] == 0, after


def test_drop_adapter_evicts_it_from_the_pool(stack, models):
    """DropAdapter of a resident adapter that no request uses frees its pages."""
    async def run():
        async with scheduler_channel(stack.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            req = make_requests(models, 2, seed=6, prefix="drop")[1]  # uses a0
            assert (await collect(stub, req)).code == grpc.StatusCode.OK
            before = await stats(stub)
            await stub.DropAdapter(scheduler_pb2.DropAdapterRequest(adapter_id="a0"))
            return before, await stats(stub)

    before, after = asyncio.run(run())
    assert after["pages_adapter"] == before["pages_adapter"] - models.adapters["a0"].num_pages
    assert after["adapters_resident"] == before["adapters_resident"] - 1


def long_request(i: int) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(request_id=f"long-{i}", prompt_token_ids=[9, 8, 7],
                                       sampling=greedy(400, ignore_eos=True))


def test_a_full_queue_refuses_with_resource_exhausted(small_stack):
    """With one request running and two waiting (the limit), the next is refused with
    RESOURCE_EXHAUSTED naming the limit; once the queue drains, requests are served."""
    async def run():
        async with scheduler_channel(small_stack.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            # The first runs before the others arrive: three at once could all find it still
            # waiting, and the third would be refused.
            calls = [stub.Submit(long_request(0))]
            await wait_for_stats(stub, lambda v: v["num_running"] == 1)
            calls += [stub.Submit(long_request(i)) for i in (1, 2)]
            full = await wait_for_stats(stub, lambda v: v["num_waiting"] == 2)
            refused = await collect(stub, long_request(3))
            for call in calls:
                call.cancel()
            await wait_for_stats(stub, lambda v: v["num_waiting"] + v["num_running"] == 0)
            served = await collect(stub, scheduler_pb2.SubmitRequest(
                request_id="short", prompt_token_ids=[9, 8], sampling=greedy(3)))
            return full, refused, served

    full, refused, served = asyncio.run(run())
    assert full["num_waiting"] == 2 and full["num_running"] == 1, full
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "2 requests waiting, limit 2" in refused.details
    assert served.code == grpc.StatusCode.OK and served.events[-1].finished


def test_killing_the_worker_ends_every_stream_with_unavailable(small_stack):
    """SIGKILL of the worker ends the running and the waiting streams with UNAVAILABLE
    within 5 s; the scheduler stays up, refuses new requests with UNAVAILABLE, and serves
    again once a worker with the same config is back at the address."""
    async def run():
        async with scheduler_channel(small_stack.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            tasks = [asyncio.create_task(collect(stub, long_request(10)))]
            await wait_for_stats(stub, lambda v: v["num_running"] == 1)  # as in the test above
            tasks += [asyncio.create_task(collect(stub, long_request(10 + i))) for i in (1, 2)]
            await wait_for_stats(stub, lambda v: v["num_running"] == 1 and v["num_waiting"] == 2)
            killed_at = time.monotonic()
            small_stack.worker.kill()
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
            elapsed = time.monotonic() - killed_at
            refused = await collect(stub, long_request(20))
            down = await stats(stub)

            small_stack.worker.wait()
            small_stack.worker, _ = start_process(
                small_stack.worker_args + ["--port", str(small_stack.worker_port)],
                "SLORA_READY worker", START_TIMEOUT_S, env=SECRET_ENV)
            up = await wait_for_stats(stub, lambda v: v["worker_available"] == 1, timeout=60)
            served = await collect(stub, scheduler_pb2.SubmitRequest(
                request_id="back", prompt_token_ids=[9, 8], sampling=greedy(3)))
            return outcomes, elapsed, refused, down, up, served

    outcomes, elapsed, refused, down, up, served = asyncio.run(run())
    for outcome in outcomes:
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
        assert "worker at 127.0.0.1:" in outcome.details
    assert elapsed < 5.0, f"streams ended {elapsed:.1f} s after the worker died"
    assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
    assert down["worker_available"] == 0 and down["pages_kv"] == 0, down
    assert up["worker_available"] == 1, up
    assert served.code == grpc.StatusCode.OK and len(served.token_ids) == 3, served
