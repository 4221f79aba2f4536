"""The tensor-parallel group's profiling mode (worker/tp_profile.py) on the CPU: an Engine at
TP = 2 on a tiny Llama (rank 0 here, rank 1 its child, gloo), SLORA_TP_PROFILE set: a decode
step of 5 requests on a rank-16 adapter over all seven modules is timed with perf_counter,
and its collectives' calls and bytes are the documented ones (models/sharding.py
lora_collective_elements; the base's two all-reduces of 2 (N-1) B h / N values per layer)."""
from __future__ import annotations

import copy
import json

import torch

from helpers_peft import make_peft_adapter, make_tiny_llama
from slora.common.config import (
    STANDARD_LORA_MODULES, EngineConfig, PoolConfig, SchedulerConfig,
)
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder
from slora.models.sharding import lora_collective_elements
from slora.worker.tp_profile import ENV, CollectiveProfile, step_kind

TP, RANK, NUM_REQS = 2, 16, 5
FLOAT32 = 4


def test_profile_is_off_without_the_variable(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert CollectiveProfile.from_env(torch.device("cpu"), TP) is None
    assert [step_kind(n) for n in ([1, 1], [7, 3], [1, 7])] == ["decode", "prefill", "mixed"]


def test_profiled_decode_step_counts_and_times_each_collective(tmp_path, monkeypatch):
    base = make_tiny_llama(str(tmp_path / "base"), num_kv_heads=2)
    adapter = make_peft_adapter(base, str(tmp_path / "r16"), r=RANK,
                                target_modules=list(STANDARD_LORA_MODULES))
    out = tmp_path / "profile.json"
    monkeypatch.setenv(ENV, str(out))
    cfg = model_config_from_folder(base)
    engine = Engine(EngineConfig(
        model=cfg, pool=PoolConfig(num_pages=2000, max_adapter_slots=2, max_lora_rank=RANK),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
        tensor_parallel_size=TP), base)
    try:
        profile = engine.worker.group.comm.profile
        assert profile is not None and not profile.cuda
        engine.add_adapter("r16", adapter)
        sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
        for i in range(NUM_REQS):
            engine.submit([3 + i, 40, 41], sp, "r16", req_id=f"p{i}")
        prefilled: set[str] = set()
        while len(prefilled) < NUM_REQS:
            prefilled |= {o.req_id for o in engine.step()}
        before = copy.deepcopy(profile.summary()["step_kinds"].get("decode"))
        assert len(engine.step()) == NUM_REQS
        after = profile.summary()["step_kinds"]["decode"]
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.close()

    def delta(kind: str, key: str):
        prev = before["collectives"].get(kind, {}).get(key, 0) if before else 0
        return after["collectives"][kind][key] - prev

    layers, n, b = cfg.num_layers, TP, NUM_REQS
    assert after["steps"] - (before["steps"] if before else 0) == 1
    # Per layer: one all-gather each for qkv and gate_up, one all-reduce each for o and down.
    assert delta("lora", "calls") == 4 * layers
    assert delta("lora", "bytes") == FLOAT32 * layers * lora_collective_elements(
        b, RANK, n, STANDARD_LORA_MODULES)
    assert delta("lora", "bytes") == FLOAT32 * layers * 9 * (n - 1) * b * RANK // n
    assert delta("base", "calls") == 2 * layers
    assert delta("base", "bytes") == FLOAT32 * layers * 2 * (2 * (n - 1) * b * cfg.hidden_size // n)
    assert delta("embed", "calls") == 1 and delta("lm_head", "calls") == 1
    assert delta("lora", "seconds") > 0 and delta("base", "seconds") > 0
    spent = sum(c["seconds"] for c in after["collectives"].values())
    assert 0 < spent <= after["forward_s"]
    assert 0 < after["lora_share"] < 1
    written = json.loads(out.read_text())  # close() writes the summary
    assert written["tensor_parallel_size"] == TP and written["timer"] == "perf_counter"
    assert written["step_kinds"]["decode"]["steps"] == profile.summary()[
        "step_kinds"]["decode"]["steps"] > after["steps"]
