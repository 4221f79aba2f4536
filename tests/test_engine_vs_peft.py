"""End to end against PEFT: greedy tokens and logits of mixed-adapter batches through the
Engine equal what Hugging Face PEFT gives for each request alone, on the same weights."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from helpers_peft import make_peft_adapter, make_tiny_llama
from slora.common.config import EngineConfig, ModelConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder


@dataclass(frozen=True)
class AdapterCase:
    name: str
    r: int
    targets: tuple[str, ...]
    alpha: float
    rslora: bool = False


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = ATTN + ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [
    AdapterCase("r1-qv", 1, ("q_proj", "v_proj"), 2),
    AdapterCase("r2-attn", 2, ATTN, 4),
    AdapterCase("r4-all", 4, ALL, 8),
    AdapterCase("r8-attn-rs", 8, ATTN, 16, rslora=True),
    AdapterCase("r16-all", 16, ALL, 16),
    AdapterCase("r32-mlp", 32, ("gate_proj", "up_proj", "down_proj"), 32),
    AdapterCase("r48-all-rs", 48, ALL, 24, rslora=True),
    AdapterCase("r64-all", 64, ALL, 64),
    AdapterCase("r3-ko", 3, ("k_proj", "o_proj"), 6),
]
NUM_REQUESTS = 27
MAX_NEW_TOKENS = 8


@dataclass
class Setup:
    base_path: str
    adapter_paths: dict[str, str]
    peft: object
    config: ModelConfig


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def setup(request, tmp_path_factory) -> Setup:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    num_kv_heads = request.param
    root = tmp_path_factory.mktemp(f"peft-{num_kv_heads}")
    base_path = make_tiny_llama(str(root / "base"), num_kv_heads=num_kv_heads, seed=3)
    paths = {}
    for i, case in enumerate(ADAPTERS):
        paths[case.name] = make_peft_adapter(
            base_path, str(root / case.name), r=case.r, target_modules=list(case.targets),
            lora_alpha=case.alpha, use_rslora=case.rslora, seed=100 + i)
    base = LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, paths[ADAPTERS[0].name], adapter_name=ADAPTERS[0].name)
    for case in ADAPTERS[1:]:
        peft.load_adapter(paths[case.name], adapter_name=case.name)
    peft.eval()
    return Setup(base_path, paths, peft, model_config_from_folder(base_path))


def peft_logits(setup: Setup, adapter: str | None, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] logits of PEFT running this request alone with its adapter."""
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        if adapter is None:
            with setup.peft.disable_adapter():
                return setup.peft(input_ids=ids).logits[0].float()
        setup.peft.set_adapter(adapter)
        return setup.peft(input_ids=ids).logits[0].float()


def peft_greedy(setup: Setup, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(peft_logits(setup, adapter, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def make_engine(setup: Setup, num_pages: int, max_lora_rank: int = 64,
                token_budget: int = 64, max_num_seqs: int = 32,
                max_model_len: int = 128) -> Engine:
    config = EngineConfig(
        model=setup.config,
        pool=PoolConfig(num_pages=num_pages, max_adapter_slots=8, max_lora_rank=max_lora_rank),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=token_budget,
                                  max_model_len=max_model_len))
    engine = Engine(config, setup.base_path)
    for case in ADAPTERS:
        if case.r <= max_lora_rank:
            engine.add_adapter(case.name, setup.adapter_paths[case.name])
    return engine


def make_requests(seed: int) -> list[tuple[list[int], str | None]]:
    rng = random.Random(seed)
    names = [None] + [c.name for c in ADAPTERS]
    reqs = []
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randint(1, 40))]
        reqs.append((prompt, names[i % len(names)]))
    return reqs


def run_staggered(engine: Engine, reqs, check=None) -> dict[str, list[int]]:
    """Submits the requests a few at a time between steps; returns tokens by req id."""
    sp = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(reqs))
    while pending or engine.has_unfinished():
        for _ in range(min(3, len(pending))):
            i, (prompt, adapter) = pending.pop(0)
            outputs[engine.submit(prompt, sp, adapter, req_id=f"r{i}")] = []
        for out in engine.step():
            outputs[out.req_id] += out.new_token_ids
        if check:
            check(engine)
    return outputs


def run_keeping_logits(engine: Engine, reqs) -> tuple[dict, dict, list]:
    """run_staggered, keeping each request's logits of every step and, per step, the
    adapters (None: no adapter) of the requests it sampled."""
    engine.worker.keep_logits = True
    step_logits: dict[str, list[torch.Tensor]] = {}
    batch_adapters: list[set[str | None]] = []

    def keep(engine):
        for req_id, logits in engine.worker.last_logits.items():
            step_logits.setdefault(req_id, []).append(logits)
        batch_adapters.append({reqs[int(req_id[1:])][1] for req_id in engine.worker.last_logits})
        engine.worker.last_logits = {}

    outputs = run_staggered(engine, reqs, check=keep)
    return outputs, step_logits, batch_adapters


def assert_peft_tokens_and_logits(setup, reqs, outputs, step_logits, label: str = "") -> None:
    """Every request's tokens are PEFT's greedy tokens for it alone, and its logits of every
    step within 1e-4 of PEFT's."""
    for i, (prompt, adapter) in enumerate(reqs):
        got = outputs[f"r{i}"]
        want = peft_greedy(setup, adapter, prompt, MAX_NEW_TOKENS)
        assert got == want, f"{label}adapter {adapter}, prompt {prompt}: {got} != PEFT {want}"
        ref = peft_logits(setup, adapter, prompt + got)[len(prompt) - 1:-1]
        ours = torch.stack(step_logits[f"r{i}"])
        err = (ours - ref).abs().max().item()
        assert err < 1e-4, f"{label}adapter {adapter}, prompt {prompt}: logits differ by {err}"


def test_mixed_adapter_batches_give_peft_tokens_and_logits(setup):
    """27 requests, 9 adapters of ranks 1-64 (attention only, MLP only, all linear, rslora)
    and no adapter, arriving 3 per step: every request's greedy tokens are PEFT's, and the
    logits of every step of the mixed batch are within 1e-4 of PEFT's."""
    engine = make_engine(setup, num_pages=4096)
    reqs = make_requests(seed=1)
    outputs, step_logits, batch_adapters = run_keeping_logits(engine, reqs)
    # The batches really mixed: as many adapters as the pool has slots, and no adapter, in
    # one step.
    slots = engine.config.pool.max_adapter_slots
    assert slots < len(ADAPTERS)
    assert max(len(a) for a in batch_adapters) == slots + 1, batch_adapters
    assert_peft_tokens_and_logits(setup, reqs, outputs, step_logits)
    stats = engine.scheduler.stats()
    assert stats["pages_kv"] == 0 and stats["num_running"] == 0
    assert stats["adapter_loads"] >= len(ADAPTERS)


def test_pool_too_small_preempts_and_still_gives_peft_tokens(setup):
    """A pool of 300 pages for ~1000 tokens of load and adapters of up to 208 pages: requests
    are preempted and recomputed, adapters evicted and reloaded, and every request still
    gets PEFT's tokens; no adapter leaves the pool while a running request uses it (checked
    after every step)."""
    engine = make_engine(setup, num_pages=300, max_lora_rank=16, max_num_seqs=16,
                         max_model_len=64)
    small = [c.name for c in ADAPTERS if c.r <= 16]
    rng = random.Random(7)
    reqs = [(prompt, rng.choice(small + [None])) for prompt, _ in make_requests(seed=2)]

    def check(engine):
        engine.scheduler.check_invariants()

    outputs = run_staggered(engine, reqs, check=check)
    for i, (prompt, adapter) in enumerate(reqs):
        want = peft_greedy(setup, adapter, prompt, MAX_NEW_TOKENS)
        assert outputs[f"r{i}"] == want, f"adapter {adapter}, prompt {prompt}"
    stats = engine.scheduler.stats()
    assert stats["preemptions"] > 0, stats
    assert stats["adapter_evictions"] > 0, stats
    assert stats["pages_kv"] == 0


def test_prefetch_into_evicted_slots_still_gives_peft_tokens(setup):
    """Four requests run at a time and the rest queue; 9 adapters share 8 slots, so once
    every slot has held one, an adapter is prefetched for the queue only by evicting an idle
    one, and its rows are written behind the forward pass of a step that does not use it.
    Every request still gets PEFT's tokens."""
    engine = make_engine(setup, num_pages=4096, max_num_seqs=4)
    execute = engine.worker.execute
    evicting_prefetches = []

    def spy(cmd):
        used = {r.adapter_slot for r in cmd.new_requests} | {
            engine.worker.requests[r.req_id].adapter_slot for r in cmd.running_requests}
        evicting_prefetches.extend(load.adapter_id for load in cmd.adapter_loads
                                   if load.slot in cmd.adapter_evictions
                                   and load.slot not in used)
        return execute(cmd)

    engine.worker.execute = spy
    reqs = make_requests(seed=3)
    outputs = run_staggered(engine, reqs, check=lambda e: e.scheduler.check_invariants())
    for i, (prompt, adapter) in enumerate(reqs):
        want = peft_greedy(setup, adapter, prompt, MAX_NEW_TOKENS)
        assert outputs[f"r{i}"] == want, f"adapter {adapter}, prompt {prompt}"
    assert evicting_prefetches, engine.scheduler.stats()
