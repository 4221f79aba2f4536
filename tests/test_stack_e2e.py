"""The whole stack as real processes on loopback (embedded valkey, worker, scheduler,
frontend), driven through the SDK: registrations, 50 concurrent streams equal to the
in-process engine, cancels that give the pool back, restarts of Redis and the frontend,
and every bad input answered with its status code while the servers keep serving. The
frontend runs with auth on; the client uses the admin key (helpers_stack.py)."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import time

import grpc
import pytest

from helpers_peft import edit_adapter_config, make_peft_adapter, make_tiny_llama
from helpers_stack import Stack, worker_argv
from slora.client import Client, SloraClientError
from slora.common.sampling_params import SamplingParams
from slora.worker.args import add_engine_args, engine_config_from_args
from slora.engine.engine import Engine

NUM_ADAPTERS = 20
RANKS = [1, 2, 4, 8, 16]
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
           ["gate_proj", "up_proj", "down_proj"], "all-linear"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=9)
    # Adapters are registered by path from this test's folders (and tmp_path of each case).
    stack = Stack(str(root), base, worker_argv(base),
                  adapter_roots=[str(tmp_path_factory.getbasetemp())])
    stack.adapters = {}
    for i in range(NUM_ADAPTERS):
        stack.adapters[f"ad-{i}"] = make_peft_adapter(
            base, str(root / f"ad-{i}"), r=RANKS[i % len(RANKS)],
            target_modules=TARGETS[i % len(TARGETS)], lora_alpha=8, seed=i)
    stack.start_all()
    yield stack
    stack.stop_all()


def in_process_engine(stack: Stack) -> Engine:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config, model_path = engine_config_from_args(parser.parse_args(stack.worker_args))
    engine = Engine(config, model_path)
    for adapter_id, path in stack.adapters.items():
        engine.add_adapter(adapter_id, path)
    return engine


def prompts(n: int) -> list[tuple[list[int], str | None]]:
    out = []
    for i in range(n):
        prompt = [(i * 37 + j * 11) % 250 + 3 for j in range(3 + i % 29)]
        out.append((prompt, None if i % 6 == 5 else f"ad-{i % NUM_ADAPTERS}"))
    return out


def test_registered_adapters_stream_the_engines_tokens(stack):
    """20 registrations, then 50 concurrent streams across them (and the base alone):
    each gets exactly the in-process engine's greedy tokens."""
    with stack.client() as c:
        for adapter_id, path in stack.adapters.items():
            record = c.register_adapter(adapter_id, path)
            assert record.adapter_id == adapter_id and record.num_pages > 0
        assert len(c.list_adapters()) == NUM_ADAPTERS
        reqs = prompts(50)

        def run(req):
            prompt, adapter = req
            return [t for e in c.stream(prompt, adapter_id=adapter, max_new_tokens=MAX_NEW,
                                        ignore_eos=True) for t in e.token_ids]

        with cf.ThreadPoolExecutor(50) as pool:
            got = list(pool.map(run, reqs))
    engine = in_process_engine(stack)
    want = engine.generate([p for p, _ in reqs],
                           SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True),
                           [a for _, a in reqs])
    for (prompt, adapter), g, w in zip(reqs, got, want):
        assert g == w, f"adapter {adapter}, prompt {prompt}: stack {g} != engine {w}"


def test_cancelled_streams_give_the_pool_back(stack):
    """20 streams cancelled after their first token: the scheduler's pool returns to its
    idle page count (no KV pages, nothing running)."""
    with stack.client() as c:
        def run_and_cancel(i):
            stream = c.stream([5 + i, 6, 7], adapter_id=f"ad-{i}", max_new_tokens=80,
                              ignore_eos=True)
            first = next(stream)
            stream.close()  # cancels the call
            return first.token_ids

        with cf.ThreadPoolExecutor(20) as pool:
            assert all(pool.map(run_and_cancel, range(20)))
    deadline = time.monotonic() + 10
    while (stats := stack.stats())["pages_kv"] != 0 or stats["num_running"] != 0:
        assert time.monotonic() < deadline, f"pool not idle after cancels: {stats}"
        time.sleep(0.1)


def test_registrations_survive_a_redis_restart(stack):
    stack.stop("redis")
    stack.start("redis")
    with stack.client() as c:
        deadline = time.monotonic() + 10
        while True:
            try:
                ids = {a.adapter_id for a in c.list_adapters()}
                break
            except SloraClientError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert ids == set(stack.adapters)
        assert c.generate([7, 8, 9], adapter_id="ad-3", max_new_tokens=3).token_ids


def test_a_restarted_frontend_keeps_serving(stack):
    with stack.client() as c:
        before = c.generate([9, 10, 11], adapter_id="ad-4", max_new_tokens=4).token_ids
    stack.stop("frontend")
    stack.start("frontend")
    with stack.client() as c:
        assert c.generate([9, 10, 11], adapter_id="ad-4", max_new_tokens=4).token_ids == before


def pickled_upload(tmp, good):
    path = os.path.join(tmp, "pickled")
    shutil.copytree(good, path, dirs_exist_ok=True)
    os.rename(os.path.join(path, "adapter_model.safetensors"),
              os.path.join(path, "adapter_model.bin"))
    return path


def malformed(tmp, good):
    path = os.path.join(tmp, "malformed")
    shutil.copytree(good, path, dirs_exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write("{oops")
    return path


def named_for(tmp, good, base_model_name: str) -> str:
    """A copy of `good` whose config names another base model."""
    return edit_adapter_config(shutil.copytree(good, os.path.join(tmp, "named")),
                               base_model_name_or_path=base_model_name)


def other_base(tmp, good):
    """An adapter made with PEFT for a model of hidden size 32 (ours has 64)."""
    base = make_tiny_llama(os.path.join(tmp, "Llama-2-13b-hf"), hidden_size=32)
    return make_peft_adapter(base, os.path.join(tmp, "other-base"), r=2)


def upload_pickle(c: Client, tmp, good):
    from slora.client.messages import upload_chunks
    from slora.v1 import adapters_pb2

    def chunks():
        yield from list(upload_chunks("pickled-up", good, "rid"))[:1]
        yield adapters_pb2.UploadAdapterChunk(chunk=adapters_pb2.FileChunk(
            file_name="adapter_model.bin", data=b"\x80\x04pickle"))
    try:
        return c._adapters.Upload(chunks(), timeout=30, metadata=c._metadata)
    except grpc.RpcError as e:
        from slora.client.errors import from_rpc_error
        raise from_rpc_error(e) from None


# (case, call, status code, words in the message)
BAD_INPUTS = [
    ("unknown adapter", lambda c, t, g: c.generate([5], adapter_id="nope"),
     grpc.StatusCode.NOT_FOUND, "nope"),
    ("empty prompt", lambda c, t, g: c.generate(""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("prompt too long", lambda c, t, g: c.generate([5] * 96), grpc.StatusCode.INVALID_ARGUMENT,
     "max_model_len"),
    ("bad temperature", lambda c, t, g: c.generate([5], temperature=-2.0),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("bad top_p", lambda c, t, g: c.generate([5], top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT,
     "top_p"),
    ("token outside vocab", lambda c, t, g: c.generate([5, 100000]),
     grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ("malformed adapter", lambda c, t, g: c.register_adapter("mal", malformed(t, g)),
     grpc.StatusCode.INVALID_ARGUMENT, "adapter_config.json"),
    ("pickled adapter by path", lambda c, t, g: c.register_adapter("pick", pickled_upload(t, g)),
     grpc.StatusCode.INVALID_ARGUMENT, "pickle"),
    ("pickled upload", upload_pickle, grpc.StatusCode.INVALID_ARGUMENT, "pickle"),
    ("adapter of another base model", lambda c, t, g: c.register_adapter("other", other_base(t, g)),
     grpc.StatusCode.FAILED_PRECONDITION, "has shape [2, 32]; this server's base model"),
]


@pytest.mark.parametrize("case, call, code, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_status_and_serving_goes_on(stack, tmp_path, case, call, code, words):
    good = stack.adapters["ad-1"]
    with stack.client() as c:
        with pytest.raises(SloraClientError) as err:
            call(c, str(tmp_path), good)
        assert err.value.code == code, f"{case}: {err.value}"
        assert words in err.value.details, f"{case}: {err.value.details}"
        assert c.generate([5, 6], adapter_id="ad-1", max_new_tokens=2).token_ids


def test_adapter_naming_another_base_registers_with_a_warning(stack, tmp_path):
    """An adapter whose config names a local folder as its base (as PEFT writes when the
    trainer loaded the model from disk) registers when its shapes fit; the reply, and Get,
    carry a warning naming both models."""
    path = named_for(str(tmp_path), stack.adapters["ad-2"], "/data/models/llama-2-7b")
    with stack.client() as c:
        record = c.register_adapter("local-base", path)
        assert [w for w in record.warnings if "'/data/models/llama-2-7b'" in w], record
        assert list(c.get_adapter("local-base").warnings) == list(record.warnings)
        assert list(c.get_adapter("ad-2").warnings) == []
        assert c.generate([5, 6], adapter_id="local-base", max_new_tokens=2).token_ids
        c.delete_adapter("local-base")


def test_full_queue_is_resource_exhausted(tmp_path):
    """A scheduler that runs one request and queues one more refuses a third at once. The
    scheduler is paused once the first runs, so the queue fills however fast the machine
    is."""
    base = make_tiny_llama(str(tmp_path / "base"), num_kv_heads=2, seed=9)
    argv = worker_argv(base)
    argv[argv.index("--max-num-seqs") + 1] = "1"
    stack = Stack(str(tmp_path), base, argv, ["--max-queue-len", "1"]).start_all()
    try:
        with stack.client() as c:
            first = c.stream([5, 6], max_new_tokens=40, ignore_eos=True)
            next(first)  # running
            stack.pause(True)
            second = c.stream([5, 7], max_new_tokens=4, ignore_eos=True)
            with cf.ThreadPoolExecutor(2) as pool:
                running = pool.submit(lambda: [e.token_ids for e in first])
                waiting = pool.submit(lambda: [e.token_ids for e in second])
                stack.wait_for_stats(lambda v: v["num_waiting"] == 1)
                with pytest.raises(SloraClientError) as err:
                    c.generate([5, 8], max_new_tokens=2)
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
                assert "queue" in err.value.details
                stack.pause(False)
                assert running.result(timeout=60) and waiting.result(timeout=60)
    finally:
        stack.stop_all()
