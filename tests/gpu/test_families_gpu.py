"""Each family on CUDA (bf16, CuPy kernels, CUDA graphs) gives the greedy tokens and logits of
the CPU float32 engine on the same weights (test_worker_gpu.py's comparison), with kernel
shapes of the real models: Mistral's sliding window shorter than the prompts (decode and
prefill attention inside the window), Qwen2's q/k/v bias and tied embeddings, Qwen3's q/k
norm with head_dim 128 wider than hidden / heads (q and o rows of two pages). And the dummy
presets of the benchmarks (dummy-qwen2.5-7b: hidden 3584, 28 heads, 4 KV heads;
dummy-qwen3-8b; dummy-mistral-7b), cut to two layers, run a decode step from a graph equal
to the same step run eagerly. Marked `gpu`."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers_peft import make_peft_adapter, make_tiny_model
from test_worker_gpu import (
    HAS_GPU, ModelCase, Setup, assert_runs_agree, make_engine, make_requests, run,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and CuPy")]

BASE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=1024)
FAMILIES = {
    "mistral-window-16": ("mistral", 2, dict(sliding_window=16)),
    "qwen2-bias-tied": ("qwen2", 2, dict(tie_word_embeddings=True)),
    "qwen3-head-dim-128": ("qwen3", 2, dict(head_dim=128)),
}
TARGETS = [("r8-attn", 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
           ("r16-all", 16, "all-linear"), ("r4-mlp", 4, ["gate_proj", "up_proj", "down_proj"])]


def clear_logits(model) -> None:
    """Weights of unit gain and logits spread over a few units (clear greedy choices), as
    test_worker_gpu.write_model makes them."""
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 1.0)
        elif name.endswith("lm_head.weight"):
            p.normal_(0.0, 0.15)
        elif p.dim() == 2:
            p.normal_(0.0, p.shape[1] ** -0.5)


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family_setup(request, tmp_path_factory) -> Setup:
    family, num_kv, overrides = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = make_tiny_model(str(root / "base"), family, num_kv_heads=num_kv, seed=3,
                           reinit=clear_logits, **dict(BASE, **overrides))
    paths = {name: make_peft_adapter(base, str(root / name), r=r, target_modules=targets,
                                     lora_alpha=2 * r, seed=50 + i)
             for i, (name, r, targets) in enumerate(TARGETS)}
    case = ModelCase(request.param, BASE["hidden_size"], BASE["intermediate_size"],
                     BASE["num_hidden_layers"], BASE["num_attention_heads"], num_kv,
                     BASE["vocab_size"])
    return Setup(case, base, paths)


def test_family_on_cuda_gives_the_cpu_engines_tokens(family_setup):
    """13 requests (prompts of 20..60 tokens, four arriving every two steps, so chunks share
    steps with decodes) over three adapters and none: CUDA with graphs against the CPU."""
    setup = family_setup
    requests = make_requests(setup.case, 13, [name for name, _, _ in TARGETS] + [None],
                             seed=5, prompt_lens=(20, 60))
    gpu = run(make_engine(setup, "cuda"), requests, per_wave=4)
    cpu = run(make_engine(setup, "cpu"), requests, per_wave=4)
    assert_runs_agree(gpu, cpu, "graphs-vs-cpu-fp32", requests, setup.case)


@pytest.mark.parametrize("preset", ["dummy-qwen2.5-7b", "dummy-qwen3-8b", "dummy-mistral-7b"])
def test_real_shapes_replay_a_decode_graph_equal_to_eager(preset):
    """Two layers of the preset's real shapes, dummy weights: 8 decode requests at context
    40 give the same logits from the graph as eagerly (bf16, within 2e-2 relative)."""
    from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
    from slora.common.sampling_params import SamplingParams
    from slora.models.registry import dummy_model_config
    from slora.protos.step import RunningRequest, StepCommand
    from slora.worker.executor import Worker

    model = dataclasses.replace(dummy_model_config(preset), num_layers=2)
    config = EngineConfig(model=model, pool=PoolConfig(num_pages=4096, max_adapter_slots=2,
                                                       max_lora_rank=16),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256,
                                                    max_model_len=256),
                          dtype="bfloat16", device="cuda")
    worker = Worker(config, None, "cuda")
    worker.keep_logits = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in worker.pool.pages:
        layer.normal_(0, 1.0, generator=gen)
    context = 40
    for i in range(8):
        tokens = [(7 * i + 3 * j) % 1000 + 3 for j in range(context + 1)]
        worker.adopt_request(f"r{i}", tokens, context, list(range(i * 50, i * 50 + context)),
                             -1, SamplingParams(max_new_tokens=4, ignore_eos=True))
    logits = {}
    for step, graphs in enumerate((True, False)):
        worker.use_cuda_graphs = graphs
        for i in range(8):  # the same step again: back to `context` computed tokens
            state = worker.requests[f"r{i}"]
            state.num_computed_tokens, state.token_ids = context, state.token_ids[:context + 1]
        cmd = StepCommand(step, running_requests=[
            RunningRequest(f"r{i}", [i * 50 + context], context, 1) for i in range(8)])
        result = worker.execute(cmd)
        assert not result.error, result.error
        logits[graphs] = torch.stack([worker.last_logits[f"r{i}"] for i in range(8)]).float()
    err = float((logits[True] - logits[False]).norm() / logits[False].norm())
    assert err < 2e-2, f"{preset}: graph and eager decode logits differ by {err:.2e}"
