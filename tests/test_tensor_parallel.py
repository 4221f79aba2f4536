"""Tensor parallelism end to end on the CPU, with real processes: the Engine at TP = 2 and 4
(rank 0 in the test process, the other ranks its children, one gloo group) on tiny Llamas
with multi-head, grouped-query (fewer KV heads than ranks at TP = 4) and unevenly split
attention, and at TP = 2 on each other family (Mistral's sliding window, Qwen2's q/k/v bias
with tied embeddings, Qwen3's q/k norms with q wider than the hidden size), 18 concurrent
requests over 8 PEFT adapters of mixed ranks and targets: greedy
tokens equal TP = 1's and Hugging Face PEFT's (float32), every step's logits within 1e-4 of
TP = 1's; and the LoRA collectives of a step move what the docs' formula says."""
from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from helpers_peft import make_peft_adapter, make_tiny_llama, make_tiny_model
from slora.common.config import (
    STANDARD_LORA_MODULES, EngineConfig, PoolConfig, SchedulerConfig,
)
from slora.common.errors import ConfigError
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder
from slora.models.sharding import lora_collective_elements

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # name: (rank, targets, lora_alpha, use_rslora)
    "r1-qv": (1, ("q_proj", "v_proj"), 2, False),
    "r2-attn": (2, ATTN, 4, False),
    "r3-ko": (3, ("k_proj", "o_proj"), 6, False),
    "r4-all": (4, ATTN + MLP, 8, False),
    "r5-mlp": (5, MLP, 5, True),
    "r8-attn-rs": (8, ATTN, 16, True),
    "r12-down-up": (12, ("down_proj", "up_proj"), 12, False),
    "r16-all": (16, ATTN + MLP, 16, False),
}
MAX_RANK = 16
BASES = {  # name: (family, make_tiny_model overrides)
    "mha": ("llama", dict(num_kv_heads=4)),
    "gqa": ("llama", dict(num_kv_heads=2)),
    "uneven": ("llama", dict(num_kv_heads=3, num_attention_heads=6, hidden_size=96)),
    "mistral-window-8": ("mistral", dict(num_kv_heads=2, sliding_window=8)),
    "qwen2-bias-tied": ("qwen2", dict(num_kv_heads=2, tie_word_embeddings=True)),
    "qwen3-head-dim-32": ("qwen3", dict(num_kv_heads=2, head_dim=32)),
}
"""uneven: 3 KV groups over 2 ranks (2 and 1, SmolLM2's cut), so the ranks' shards differ.
qwen3: q is 128 wide on a hidden size of 64, so q's and o's LoRA rows span two pages."""
CASES = [("mha", 2), ("mha", 4), ("gqa", 2), ("gqa", 4), ("uneven", 2),
         ("mistral-window-8", 2), ("qwen2-bias-tied", 2), ("qwen3-head-dim-32", 2)]
NUM_REQUESTS = 18
MAX_NEW_TOKENS = 6
LOGITS_ATOL = 1e-4


@dataclass
class Reference:
    """One base model: its adapters, the requests, and what TP = 1 and PEFT give."""

    base_path: str
    adapter_paths: dict[str, str]
    requests: list[tuple[list[int], str | None]]
    peft_tokens: list[list[int]]
    tp1_tokens: list[list[int]]
    tp1_logits: dict[tuple[int, int], torch.Tensor]


def make_engine(ref: Reference, tp: int) -> Engine:
    config = EngineConfig(
        model=model_config_from_folder(ref.base_path),
        pool=PoolConfig(num_pages=3000, max_adapter_slots=8, max_lora_rank=MAX_RANK),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=128,
                                  max_model_len=128),
        tensor_parallel_size=tp)
    engine = Engine(config, ref.base_path)
    for name, path in ref.adapter_paths.items():
        engine.add_adapter(name, path)
    engine.worker.keep_logits = True
    return engine


def run_concurrently(engine: Engine, requests) -> tuple[list[list[int]], dict]:
    """Submits every request at once, steps to the end; returns each one's tokens and the
    logits of its i-th token by (request index, i)."""
    sp = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    req_ids = [engine.submit(p, sp, a, req_id=f"r{i}") for i, (p, a) in enumerate(requests)]
    tokens: dict[str, list[int]] = {r: [] for r in req_ids}
    logits = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.req_id] += out.new_token_ids
        for req_id, row in engine.worker.last_logits.items():
            logits[(int(req_id[1:]), len(tokens[req_id]) - 1)] = row
    return [tokens[r] for r in req_ids], logits


def peft_greedy(peft, adapter: str | None, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            x = torch.tensor([ids])
            if adapter is None:
                with peft.disable_adapter():
                    out = peft(input_ids=x).logits
            else:
                peft.set_adapter(adapter)
                out = peft(input_ids=x).logits
            ids.append(int(out[0, -1].argmax()))
    return ids[len(prompt):]


_references: dict[str, Reference] = {}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    def get(base: str) -> Reference:
        if base not in _references:
            _references[base] = _make_reference(base, tmp_path_factory.mktemp(f"tp-{base}"))
        return _references[base]
    yield get
    _references.clear()


def _make_reference(base: str, root) -> Reference:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family, overrides = BASES[base]
    base_path = make_tiny_model(str(root / "base"), family, seed=7, **overrides)
    paths = {name: make_peft_adapter(base_path, str(root / name), r=r, target_modules=list(t),
                                     lora_alpha=alpha, use_rslora=rs, seed=50 + i)
             for i, (name, (r, t, alpha, rs)) in enumerate(ADAPTERS.items())}
    rng = random.Random(base)
    names = [None, *ADAPTERS]
    requests = [([rng.randrange(3, 256) for _ in range(rng.randint(1, 30))],
                 names[i % len(names)]) for i in range(NUM_REQUESTS)]
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    first, *rest = ADAPTERS
    peft = PeftModel.from_pretrained(model, paths[first], adapter_name=first)
    for name in rest:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()
    peft_tokens = [peft_greedy(peft, a, p) for p, a in requests]
    ref = Reference(base_path, paths, requests, peft_tokens, [], {})
    engine = make_engine(ref, 1)
    ref.tp1_tokens, ref.tp1_logits = run_concurrently(engine, requests)
    return ref


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-tp{n}" for b, n in CASES])
def case(request, references):
    base, tp = request.param
    ref = references(base)
    engine = make_engine(ref, tp)
    try:
        yield ref, engine, tp
    finally:
        engine.close()


def test_tp1_engine_gives_peft_tokens(references):
    """The oracle of the cases below: TP = 1 itself equals PEFT on every base."""
    for base in BASES:
        ref = references(base)
        assert ref.tp1_tokens == ref.peft_tokens, base


def test_sharded_engine_gives_tp1_and_peft_tokens_and_tp1_logits(case):
    ref, engine, tp = case
    tokens, logits = run_concurrently(engine, ref.requests)
    for i, (prompt, adapter) in enumerate(ref.requests):
        where = f"TP={tp}, adapter {adapter}, prompt {prompt}"
        assert tokens[i] == ref.tp1_tokens[i], where
        assert tokens[i] == ref.peft_tokens[i], where
    assert logits.keys() == ref.tp1_logits.keys()
    worst = max((logits[k] - ref.tp1_logits[k]).abs().max().item() for k in logits)
    assert worst <= LOGITS_ATOL, f"TP={tp}: logits differ from TP=1 by up to {worst:.2e}"


RENDEZVOUS_CHECK = """
import os, stat, sys
from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder
engine = Engine(EngineConfig(model=model_config_from_folder(sys.argv[1]),
                             pool=PoolConfig(num_pages=1024, max_lora_rank=8),
                             scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                       max_model_len=64),
                             tensor_parallel_size=2), sys.argv[1])
rendezvous = engine.worker.group.rendezvous_dir
st = os.stat(rendezvous)
print("MODE", oct(stat.S_IMODE(st.st_mode)), st.st_uid == os.getuid(), os.listdir(rendezvous))
engine.close()
print("GONE", not os.path.exists(rendezvous))
"""


def test_the_groups_rendezvous_is_private_to_this_user_and_gone_when_it_closes(references):
    """The ranks meet through a FileStore in a directory only this user may open (a TCP
    store on a loopback port would let any local user join the group and read the step
    commands); closing the group removes it. In a process of its own: this one's group is
    the module's engines'."""
    proc = subprocess.run([sys.executable, "-P", "-c", RENDEZVOUS_CHECK,
                           references("gqa").base_path], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MODE 0o700 True ['store']" in proc.stdout, proc.stdout
    assert "GONE True" in proc.stdout, proc.stdout


def test_lora_collectives_of_a_decode_step_move_the_documented_count(case):
    """A decode step of B requests on a rank-16 adapter over all seven modules: per layer the
    LoRA collectives send lora_collective_elements(B, 16, N, all seven) values (9 (N-1) B r / N),
    the base's two all-reduces 4 (N-1) B h / N."""
    ref, engine, tp = case
    comm = engine.worker.group.comm
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    num_reqs = 5
    for i in range(num_reqs):
        engine.submit([3 + i, 40, 41], sp, "r16-all", req_id=f"count{i}")
    prefilled: set[str] = set()
    while len(prefilled) < num_reqs:
        prefilled |= {out.req_id for out in engine.step()}
    before = dict(comm.elements)
    outputs = engine.step()
    assert len(outputs) == num_reqs and all(len(o.new_token_ids) == 1 for o in outputs)
    cfg = engine.config.model
    lora = comm.elements["lora"] - before.get("lora", 0)
    base = comm.elements["base"] - before.get("base", 0)
    per_layer = lora_collective_elements(num_reqs, MAX_RANK, tp, STANDARD_LORA_MODULES)
    assert lora == cfg.num_layers * per_layer
    assert lora == cfg.num_layers * 9 * (tp - 1) * num_reqs * MAX_RANK // tp
    assert base == cfg.num_layers * 2 * (2 * (tp - 1) * num_reqs * cfg.hidden_size // tp)
    while engine.has_unfinished():
        engine.step()


@pytest.mark.parametrize("tp,words", [(8, ["8", "4 attention heads"]), (0, ["[1, 64]", "0"]),
                                      (3, ["3", "2 KV heads"])])
def test_a_group_the_model_cannot_be_cut_into_is_refused_before_any_rank_starts(
        tmp_path, tp, words):
    """ConfigError naming both sizes (checked before rank 0 starts the other ranks)."""
    base = make_tiny_llama(str(tmp_path / "base"), num_kv_heads=2)
    with pytest.raises(ConfigError) as e:
        Engine(EngineConfig(model=model_config_from_folder(base), pool=PoolConfig(num_pages=4096),
                            scheduler=SchedulerConfig(max_model_len=128),
                            tensor_parallel_size=tp), base)
    for word in words:
        assert word in str(e.value)
