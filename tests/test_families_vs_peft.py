"""Every family against PEFT: a tiny random model of each family built with transformers'
own config class, PEFT adapters of mixed ranks and targets, and 18 requests arriving a few
per step through the Engine give PEFT's greedy tokens for each request alone, with the
mixed batches' logits within 1e-4 of PEFT's (fp32, CPU). The oracle is
test_engine_vs_peft.py's."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from helpers_peft import make_peft_adapter, make_tiny_model
from test_engine_vs_peft import Setup, assert_peft_tokens_and_logits, run_keeping_logits
from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [  # (rank, targets, alpha, rslora)
    (1, ("q_proj", "v_proj"), 2, False),
    (2, ATTN, 4, False),
    (4, ATTN + MLP, 8, False),
    (8, ("k_proj", "o_proj"), 16, True),
    (16, MLP, 16, False),
    (32, ATTN + MLP, 24, True),
]
NUM_REQUESTS = 18
MAX_PROMPT = 40


@dataclass(frozen=True)
class FamilyCase:
    """A tiny model of one family, in the family's transformers config fields."""

    family: str
    num_kv_heads: int
    overrides: dict = field(default_factory=dict)
    expect: dict = field(default_factory=dict)
    """ModelConfig fields the family must have derived from the config.json."""


CASES = {
    "llama3-gqa-rope-scaling": FamilyCase("llama", 1, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral-window-8": FamilyCase("mistral", 2, dict(sliding_window=8),
                                   dict(sliding_window=8)),
    "qwen2-gqa-bias-tied": FamilyCase("qwen2", 2, dict(tie_word_embeddings=True),
                                      dict(qkv_bias=True, tie_word_embeddings=True)),
    "qwen2-mha-bias": FamilyCase("qwen2", 4, {}, dict(qkv_bias=True)),
    "qwen3-gqa-head-dim-32": FamilyCase("qwen3", 2, dict(head_dim=32),
                                        dict(qk_norm=True, head_dim=32)),
}
"""Qwen3's head_dim 32 makes q 128 wide on a hidden size of 64: q's and o's LoRA rows take
two pages each. Mistral's window of 8 is shorter than most prompts (up to 40 tokens)."""


def adapter_name(i: int) -> str:
    r, targets, _, rslora = ADAPTERS[i]
    return f"r{r}-{len(targets)}mod{'-rs' if rslora else ''}"


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def setup(request, tmp_path_factory) -> Setup:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = make_tiny_model(str(root / "base"), case.family, num_kv_heads=case.num_kv_heads,
                           seed=5, **case.overrides)
    paths = {}
    for i, (r, targets, alpha, rslora) in enumerate(ADAPTERS):
        paths[adapter_name(i)] = make_peft_adapter(
            base, str(root / adapter_name(i)), r=r, target_modules=list(targets),
            lora_alpha=alpha, use_rslora=rslora, seed=200 + i)
    names = list(paths)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()
    config = model_config_from_folder(base)
    assert config.model_type == case.family
    for key, value in case.expect.items():
        assert getattr(config, key) == value, (key, getattr(config, key))
    return Setup(base, paths, peft, config)


def make_engine(setup: Setup) -> Engine:
    config = EngineConfig(
        model=setup.config,
        pool=PoolConfig(num_pages=4096, max_adapter_slots=len(ADAPTERS), max_lora_rank=32),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=64,
                                  max_model_len=128))
    engine = Engine(config, setup.base_path)
    for name, path in setup.adapter_paths.items():
        engine.add_adapter(name, path)
    return engine


def test_family_mixed_adapter_batches_give_peft_tokens_and_logits(setup):
    """18 requests over 6 adapters (ranks 1-32; attention, MLP, all; rslora) and the base
    alone, 3 arriving per step: each request's greedy tokens are PEFT's, and every step's
    logits within 1e-4 of PEFT's."""
    engine = make_engine(setup)
    rng = random.Random(11)
    names = [None] + list(setup.adapter_paths)
    reqs = [([rng.randrange(3, 256) for _ in range(rng.randint(2, MAX_PROMPT))],
             names[i % len(names)]) for i in range(NUM_REQUESTS)]
    outputs, step_logits, batch_adapters = run_keeping_logits(engine, reqs)
    assert max(len(a) for a in batch_adapters) >= 4, batch_adapters  # batches really mixed
    assert_peft_tokens_and_logits(setup, reqs, outputs, step_logits,
                                  f"{setup.config.model_type}: ")
