"""Each family through the real stack (embedded valkey, worker, scheduler, frontend as
processes on loopback, driven by the SDK): a tiny saved model folder of Mistral (a window
shorter than the prompts), Qwen2 (q/k/v bias, tied embeddings) and Qwen3 (q/k norm, head_dim
apart from hidden / heads) serves PEFT's greedy tokens. And every `dummy-<family>-<size>`
preset is what `slora up --model ...` and the worker build, across processes unchanged."""
from __future__ import annotations

import argparse
import concurrent.futures as cf

import pytest
import torch

from helpers_peft import make_peft_adapter, make_tiny_model
from helpers_stack import Stack, worker_argv
from test_engine_vs_peft import Setup, peft_greedy
from slora.models.registry import DUMMY_MODELS, model_config_from_folder
from slora.protos.model_info import engine_config_from_model_info, model_info_from_config
from slora.worker.args import add_engine_args, engine_config_from_args

MAX_NEW = 6
FAMILIES = {
    "mistral-window-8": ("mistral", dict(sliding_window=8)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-head-dim-32": ("qwen3", dict(head_dim=32)),
}
ADAPTERS = {"attn-r4": (4, ["q_proj", "k_proj", "v_proj", "o_proj"]),
            "all-r8": (8, "all-linear")}


@pytest.mark.parametrize("case", list(FAMILIES))
def test_a_family_folder_serves_peft_tokens_through_the_stack(case, tmp_path):
    """Two adapters registered through the frontend, eight concurrent streams (the base
    alone and each adapter): each stream's tokens are PEFT's greedy tokens for it alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family, overrides = FAMILIES[case]
    base = make_tiny_model(str(tmp_path / "base"), family, num_kv_heads=2, seed=7, **overrides)
    paths = {name: make_peft_adapter(base, str(tmp_path / name), r=r, target_modules=targets,
                                     lora_alpha=2 * r, seed=i)
             for i, (name, (r, targets)) in enumerate(ADAPTERS.items())}
    reqs = [([(i * 31 + j * 7) % 250 + 3 for j in range(5 + 4 * i)],
             [None, *ADAPTERS][i % 3]) for i in range(8)]
    stack = Stack(str(tmp_path), base, worker_argv(base), adapter_roots=[str(tmp_path)])
    stack.start_all()
    try:
        with stack.client() as c:
            for name, path in paths.items():
                c.register_adapter(name, path)

            def run(req):
                prompt, adapter = req
                return [t for e in c.stream(prompt, adapter_id=adapter, max_new_tokens=MAX_NEW,
                                            ignore_eos=True) for t in e.token_ids]

            with cf.ThreadPoolExecutor(len(reqs)) as pool:
                got = list(pool.map(run, reqs))
    finally:
        stack.stop_all()
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(paths)
    peft = PeftModel.from_pretrained(hf, paths[names[0]], adapter_name=names[0])
    peft.load_adapter(paths[names[1]], adapter_name=names[1])
    setup = Setup(base, paths, peft.eval(), model_config_from_folder(base))
    for (prompt, adapter), tokens in zip(reqs, got):
        want = peft_greedy(setup, adapter, prompt, MAX_NEW)
        assert tokens == want, f"{case}, adapter {adapter}, prompt {prompt}: {tokens} != {want}"


@pytest.mark.parametrize("name", list(DUMMY_MODELS))
def test_a_dummy_preset_is_the_model_the_worker_and_the_scheduler_see(name):
    """`--model dummy-<family>-<size>` gives that family's config (features, LoRA targets,
    page geometry), and the scheduler rebuilds it exactly from the worker's Info."""
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config, path = engine_config_from_args(parser.parse_args(
        ["--model", name, "--device", "cpu", "--num-pages", "200000", "--max-model-len", "512"]))
    assert path is None and config.model.name == name
    family = name.split("-")[1]
    assert config.model.model_type == {"tiny": "llama", "qwen2.5": "qwen2"}.get(family, family)
    assert engine_config_from_model_info(model_info_from_config(config, None)) == config
