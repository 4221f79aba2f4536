"""No adapter-slot cap (issue 28): the unified pool's pages are the only bound on how many
adapters are resident and run in one batch, through the real worker on the CPU, with
Hugging Face PEFT as the oracle."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from helpers_peft import make_peft_adapter, make_tiny_llama
from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder

NUM_ADAPTERS = 200
"""More distinct adapters in one batch than any fixed slot count slora had (64; 128 in the
benchmark)."""
NUM_NEW_TOKENS = 3


def seeded_copies(template: str, root: str, num: int) -> list[str]:
    """`num` PEFT folders with the template's adapter_config.json and tensors of the same
    names and shapes, drawn from a generator seeded by the copy's index (PEFT itself made
    the template; making 200 through PEFT would take most of a minute)."""
    tensors = load_file(os.path.join(template, "adapter_model.safetensors"))
    paths = []
    for i in range(num):
        path = os.path.join(root, f"ad{i}")
        os.makedirs(path, exist_ok=True)
        shutil.copy(os.path.join(template, "adapter_config.json"), path)
        gen = torch.Generator().manual_seed(1000 + i)
        save_file({k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
                  os.path.join(path, "adapter_model.safetensors"))
        paths.append(path)
    return paths


def peft_greedy(base_path: str, adapter_path: str, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_path).eval()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_200_distinct_adapters_run_in_one_batch_with_peft_tokens(tmp_path):
    """200 requests, each with its own adapter, are admitted in one step and decode
    together: 200 adapters resident at once, in 200 slots of tables sized from the pool
    (one slot per page); a sample of them gives PEFT's greedy tokens."""
    base = make_tiny_llama(str(tmp_path / "base"), seed=5)
    template = make_peft_adapter(base, str(tmp_path / "template"), r=2,
                                 target_modules=["q_proj", "v_proj"], lora_alpha=4)
    with open(os.path.join(template, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 2
    paths = seeded_copies(template, str(tmp_path), NUM_ADAPTERS)
    num_pages = 2500  # KV 200 x 7 tokens + 200 adapters x 4 pages, and room to spare
    engine = Engine(EngineConfig(
        model=model_config_from_folder(base),
        pool=PoolConfig(num_pages=num_pages, max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=NUM_ADAPTERS, max_num_batched_tokens=1024,
                                  max_model_len=32)), base)
    assert engine.worker.pool.lora_ranks.shape[1] == num_pages
    for i, path in enumerate(paths):
        engine.add_adapter(f"ad{i}", path)
    prompts = [[3 + i % 50, 7, 11 + i % 13, 4] for i in range(NUM_ADAPTERS)]
    params = SamplingParams(max_new_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    req_ids = [engine.submit(p, params, f"ad{i}") for i, p in enumerate(prompts)]
    first = engine.scheduler.schedule()
    assert len(first.new_requests) == NUM_ADAPTERS
    assert len({n.adapter_slot for n in first.new_requests}) == NUM_ADAPTERS
    outputs = {r: [] for r in req_ids}
    for out in engine.scheduler.update(engine.worker.execute(first)):
        outputs[out.req_id] += out.new_token_ids
    assert engine.scheduler.stats()["adapters_resident"] == NUM_ADAPTERS
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.req_id] += out.new_token_ids
    for i in (0, 57, 128, NUM_ADAPTERS - 1):
        expected = peft_greedy(base, paths[i], prompts[i], NUM_NEW_TOKENS)
        assert outputs[req_ids[i]] == expected, f"adapter ad{i}, prompt {prompts[i]}"
    assert len({tuple(o) for o in outputs.values()}) > 20  # the adapters really differ
