"""Bad input to the Engine gets its own clear error, and the engine goes on serving the
other requests with unchanged tokens."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from helpers_peft import make_peft_adapter, make_tiny_llama
from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.errors import (
    AdapterError, AdapterNotFoundError, ConfigError, InvalidRequestError, QueueFullError,
)
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=5)
    good = make_peft_adapter(base, str(root / "good"), r=4,
                             target_modules=["q_proj", "v_proj", "down_proj"], seed=1)
    return root, base, good


def make_engine(base: str, max_queue_len: int = 64) -> Engine:
    return Engine(EngineConfig(
        model=model_config_from_folder(base),
        pool=PoolConfig(num_pages=1024, max_adapter_slots=4, max_lora_rank=16),
        scheduler=SchedulerConfig(max_num_batched_tokens=32, max_model_len=64,
                                  max_queue_len=max_queue_len)), base)


def broken_adapter(root, good: str, name: str) -> str:
    """A copy of the good adapter with one defect; returns its folder."""
    path = str(root / f"bad-{name}")
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(good, path)
    cfg_file = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, "adapter_model.safetensors")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if name == "pickle":
        os.rename(weights, os.path.join(path, "adapter_model.bin"))
    elif name == "missing-weights":
        os.remove(weights)
    elif name == "malformed-config":
        with open(cfg_file, "w") as f:
            f.write("{not json")
    elif name == "rank-too-high":
        cfg["r"] = 32
    elif name == "unknown-target":
        cfg["target_modules"] = ["q_proj", "lm_head"]
    elif name == "shape-mismatch":
        tensors = load_file(weights)
        key = next(k for k in tensors if "q_proj.lora_A" in k)
        tensors[key] = tensors[key][:, :32].contiguous()
        save_file(tensors, weights)
    if name in ("rank-too-high", "unknown-target"):
        with open(cfg_file, "w") as f:
            json.dump(cfg, f)
    return path


# (defect, words the error must contain besides the adapter id)
ADAPTER_CASES = [
    ("pickle", "pickle"),
    ("missing-weights", "adapter_model.safetensors"),
    ("malformed-config", "adapter_config.json"),
    ("rank-too-high", "32"),
    ("unknown-target", "lm_head"),
    ("shape-mismatch", "shape"),
]

SP = SamplingParams(max_new_tokens=6, ignore_eos=True)
REQUEST_CASES = [
    ("empty prompt", lambda e: e.submit([], SP), InvalidRequestError, "empty"),
    ("prompt too long", lambda e: e.submit([5] * 64, SP), InvalidRequestError, "max_model_len"),
    ("token outside vocab", lambda e: e.submit([5, 999], SP), InvalidRequestError, "vocabulary"),
    ("unknown adapter", lambda e: e.submit([5], SP, "nope"), AdapterNotFoundError, "nope"),
    ("bad temperature", lambda e: e.submit([5], SamplingParams(temperature=-1)),
     InvalidRequestError, "temperature"),
    ("bad top_p", lambda e: e.submit([5], SamplingParams(top_p=0.0)), InvalidRequestError, "top_p"),
    ("bad top_k", lambda e: e.submit([5], SamplingParams(top_k=-3)), InvalidRequestError, "top_k"),
    ("bad max_new_tokens", lambda e: e.submit([5], SamplingParams(max_new_tokens=0)),
     InvalidRequestError, "max_new_tokens"),
    ("stop token outside vocab", lambda e: e.submit([5], SamplingParams(stop_token_ids=[10**6])),
     InvalidRequestError, "stop_token_ids"),
]


def reference_tokens(base: str, good: str) -> list[list[int]]:
    engine = make_engine(base)
    engine.add_adapter("good", good)
    return engine.generate([[7, 8, 9], [10, 11], [12] * 20], SP, ["good", None, "good"])


def test_each_bad_input_gets_its_error_and_serving_goes_on(folders):
    """While three requests are running, every bad adapter and every bad request is
    refused with its own error; the three requests finish with the tokens they get alone."""
    root, base, good = folders
    want = reference_tokens(base, good)
    engine = make_engine(base)
    engine.add_adapter("good", good)
    ids = [engine.submit(p, SP, a) for p, a in
           [([7, 8, 9], "good"), ([10, 11], None), ([12] * 20, "good")]]
    got = {i: [] for i in ids}
    for out in engine.step():
        got[out.req_id] += out.new_token_ids

    for defect, words in ADAPTER_CASES:
        path = broken_adapter(root, good, defect)
        with pytest.raises(AdapterError) as err:
            engine.add_adapter(f"bad-{defect}", path)
        msg = str(err.value)
        assert f"bad-{defect}" in msg and words in msg, f"{defect}: {msg}"
        for out in engine.step():
            got[out.req_id] += out.new_token_ids

    for name, call, error, words in REQUEST_CASES:
        with pytest.raises(error) as err:
            call(engine)
        assert words in str(err.value), f"{name}: {err.value}"
        for out in engine.step():
            got[out.req_id] += out.new_token_ids

    while engine.has_unfinished():
        for out in engine.step():
            got[out.req_id] += out.new_token_ids
    assert [got[i] for i in ids] == want


def test_full_queue_refuses_then_accepts_again(folders):
    _, base, _ = folders
    engine = make_engine(base, max_queue_len=2)
    engine.submit([5], SP)
    engine.submit([6], SP)
    with pytest.raises(QueueFullError, match="queue full"):
        engine.submit([7], SP)
    engine.step()  # both admitted: the queue empties
    engine.submit([7], SP)


def test_pool_too_small_for_one_request_is_a_config_error(folders):
    _, base, _ = folders
    with pytest.raises(ConfigError, match="cannot hold one request"):
        EngineConfig(model=model_config_from_folder(base),
                     pool=PoolConfig(num_pages=100, max_lora_rank=16),
                     scheduler=SchedulerConfig(max_model_len=64))


def test_adapter_broken_after_registration_fails_only_its_requests(folders, tmp_path):
    """With no host cache, an adapter whose files break after registration ends its own
    requests with an error naming it; the other requests (another adapter loaded in the
    same step, and the base) still get their tokens."""
    root, base, good = folders
    fragile = str(tmp_path / "fragile")
    shutil.copytree(good, fragile)
    other = make_peft_adapter(base, str(tmp_path / "other"), r=2,
                              target_modules=["k_proj", "up_proj"], seed=2)
    want_engine = make_engine(base)
    want_engine.add_adapter("other", other)
    want = want_engine.generate([[3, 4], [5, 6, 7]], SP, ["other", None])

    engine = make_engine(base)
    engine.worker.host_cache.capacity_bytes = 0  # every load reads the files again
    engine.add_adapter("fragile", fragile)
    engine.add_adapter("other", other)
    ids = [engine.submit(p, SP, a) for p, a in
           [([1, 2], "fragile"), ([3, 4], "other"), ([5, 6, 7], None)]]
    os.remove(os.path.join(fragile, "adapter_model.safetensors"))
    got = {i: [] for i in ids}
    errors = {}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.req_id] += out.new_token_ids
            if out.error:
                errors[out.req_id] = out.error
    assert list(errors) == [ids[0]] and "fragile" in errors[ids[0]]
    assert [got[ids[1]], got[ids[2]]] == want
