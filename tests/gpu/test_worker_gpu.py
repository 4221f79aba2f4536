"""The Engine on CUDA (bf16, CuPy kernels): steps replayed from CUDA graphs (decode batches,
and mixed steps of prefill chunks and decode tokens) give the greedy tokens of the same steps
run eagerly, and of the CPU float32 engine on the same weights, for batches that mix adapters
of different ranks and targets with requests that use none, as the batch shrinks through
several graph buckets and long prompts are prefilled in chunks beside running decodes.

Two runs agree when every request's tokens are equal, or where they part, the reference's
logits put the two tokens within a margin of each other (a near-tie that rounding may flip;
later tokens are then not compared). While the tokens agree, each step's logits must match
the reference's within a relative error looked up by the pair of runs. At least half of all
output positions must be compared, so a test cannot pass on near-ties alone; a wrong page or
slot shows at once as a logits error far above the tolerance.

Weights and adapters are written here as Hugging Face / PEFT folders (safetensors) from a
seeded CPU generator, so both devices load the same numbers. Marked `gpu`: run with
`pytest -m gpu`; skipped without CUDA or CuPy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass

import pytest
import torch

from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.models.registry import model_config_from_folder

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and CuPy")]

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = ATTN + ("gate_proj", "up_proj", "down_proj")
MAX_NUM_SEQS = 16
"""Graph buckets 1, 2, 4, 8, 16."""


@dataclass(frozen=True)
class ModelCase:
    name: str
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab: int


@dataclass(frozen=True)
class AdapterCase:
    name: str
    r: int
    targets: tuple[str, ...]
    alpha: float


MODELS = [
    ModelCase("tiny-gqa-hd64", 256, 512, 2, 4, 2, 512),
    ModelCase("mid-mha-hd128", 1024, 2816, 4, 8, 8, 2048),
]
ADAPTERS = [
    AdapterCase("r8-attn", 8, ATTN, 16),
    AdapterCase("r16-all", 16, ALL, 32),
    AdapterCase("r64-qv", 64, ("q_proj", "v_proj"), 64),
    AdapterCase("r2-mlp", 2, ("gate_proj", "up_proj", "down_proj"), 4),
]
# (run, reference) -> (relative logits error, near-tie margin as a fraction of the
# reference logits' standard deviation). bf16 against float32: these random layers of unit
# gain amplify bf16 rounding (8 bits) from layer to layer; the mid model's prefill logits
# measured 4.2e-2 on the H100 (2026-11-23). Graphs against eager: both bf16, but a mixed
# graph runs its decode tokens through the causal attention kernel and the MBGMM LoRA kernels
# (eager: split-context decode attention and MBGMV), so the two sum in different orders;
# measured 2.4e-2 on the mid model, where each was 4.6e-2 and 5.1e-2 from float32.
TOLERANCE = {"graphs-vs-eager": (4e-2, 0.1), "graphs-vs-cpu-fp32": (8e-2, 0.15),
             "eager-vs-cpu-fp32": (8e-2, 0.15)}
MIN_COMPARED = 0.5
"""Share of all output positions that two runs must compare (before any divergence)."""


def module_shapes(m: ModelCase) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection."""
    hd = m.hidden // m.num_heads
    q, kv, h, i = m.num_heads * hd, m.num_kv_heads * hd, m.hidden, m.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def write_model(path: str, m: ModelCase, seed: int) -> str:
    """A Llama folder (config.json + model.safetensors) of seeded float32 weights, scaled so
    that logits spread over a few units (clear greedy choices)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
               "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    tensors = {"model.embed_tokens.weight": rand(m.vocab, m.hidden, std=1.0),
               "model.norm.weight": 1 + rand(m.hidden, std=0.1),
               "lm_head.weight": rand(m.vocab, m.hidden, std=0.15)}
    for i in range(m.num_layers):
        for mod, (d_in, d_out) in module_shapes(m).items():
            tensors[f"model.layers.{i}.{parents[mod]}.{mod}.weight"] = rand(
                d_out, d_in, std=1.0 / d_in ** 0.5)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = 1 + rand(m.hidden, std=0.1)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config = {"model_type": "llama", "hidden_act": "silu", "vocab_size": m.vocab,
              "hidden_size": m.hidden, "intermediate_size": m.intermediate,
              "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
              "num_key_value_heads": m.num_kv_heads, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 1024,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def write_adapter(path: str, m: ModelCase, a: AdapterCase, seed: int) -> str:
    """A PEFT LoRA folder of seeded random A and B (PEFT's own zero B would be a no-op)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
               "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    tensors = {}
    for i in range(m.num_layers):
        for mod in a.targets:
            d_in, d_out = module_shapes(m)[mod]
            key = f"base_model.model.model.layers.{i}.{parents[mod]}.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(a.r, d_in, generator=gen) / d_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, a.r, generator=gen) / a.r
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": a.r, "lora_alpha": a.alpha,
              "target_modules": list(a.targets), "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return path


@dataclass
class Setup:
    case: ModelCase
    model_path: str
    adapter_paths: dict[str, str]


@pytest.fixture(scope="module", params=MODELS, ids=[m.name for m in MODELS])
def setup(request, tmp_path_factory) -> Setup:
    m: ModelCase = request.param
    root = tmp_path_factory.mktemp(m.name)
    model_path = write_model(str(root / "base"), m, seed=7)
    paths = {a.name: write_adapter(str(root / a.name), m, a, seed=100 + i)
             for i, a in enumerate(ADAPTERS)}
    return Setup(m, model_path, paths)


def make_engine(setup: Setup, device: str, cuda_graphs: bool = True):
    from slora.engine.engine import Engine

    config = EngineConfig(
        model=model_config_from_folder(setup.model_path),
        pool=PoolConfig(num_pages=8192, max_adapter_slots=8, max_lora_rank=64),
        scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64,
                                  max_model_len=256),
        dtype="bfloat16" if device == "cuda" else "float32", device=device)
    engine = Engine(config, setup.model_path, backend="cuda" if device == "cuda" else "torch")
    if device == "cuda" and not cuda_graphs:
        engine.worker.use_cuda_graphs = False
    for name, path in setup.adapter_paths.items():
        engine.add_adapter(name, path)
    return engine


@dataclass
class Run:
    tokens: dict[int, list[int]]
    logits: dict[int, list[torch.Tensor]]
    """Per request (index into the prompts), the float32 logits of each output token."""


MAX_NEW_TOKENS = (3, 4, 5, 6, 7, 8, 9, 10, 10, 11, 11, 13, 15)
"""Output lengths of 13 requests: as they finish, the decode batch goes 13, ..., 9 (bucket
16), 8..5 (8), 4, 3 (4), 2 (2), 1 (1)."""


def make_requests(case: ModelCase, num: int, adapters: list[str | None], seed: int,
                  prompt_lens: tuple[int, int] = (3, 12)):
    """Prompts of prompt_lens tokens (the default: prefilled in the first steps) and the
    output lengths of MAX_NEW_TOKENS, so that the decode batch shrinks through every bucket;
    adapters round-robin."""
    rng = random.Random(seed)
    max_new = list(MAX_NEW_TOKENS[-num:])
    rng.shuffle(max_new)
    return [([rng.randrange(3, case.vocab) for _ in range(rng.randint(*prompt_lens))],
             max_new[i], adapters[i % len(adapters)]) for i in range(num)]


def run(engine, requests, per_wave: int | None = None) -> Run:
    """Runs the requests to the end; with `per_wave`, they arrive that many every two
    steps (so that prefill chunks share steps with running decodes)."""
    engine.worker.keep_logits = True
    engine.worker.last_logits = {}
    ids = {}
    waiting = list(enumerate(requests))
    per_wave = per_wave or len(requests)
    out = Run({i: [] for i in range(len(requests))}, {i: [] for i in range(len(requests))})
    num_steps = 0
    while waiting or engine.has_unfinished():
        if num_steps % 2 == 0:
            for i, (prompt, max_new, adapter) in waiting[:per_wave]:
                sp = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
                ids[engine.submit(prompt, sp, adapter)] = i
            waiting = waiting[per_wave:]
        num_steps += 1
        outputs = engine.step()
        for req_id, logits in engine.worker.last_logits.items():
            out.logits[ids[req_id]].append(logits.float())
        engine.worker.last_logits = {}
        for o in outputs:
            out.tokens[ids[o.req_id]] += o.new_token_ids
    return out


def assert_runs_agree(got: Run, ref: Run, what: str, requests, case: ModelCase) -> None:
    rel_tol, margin_frac = TOLERANCE[what]
    num_compared = num_total = 0
    worst = 0.0
    for i, ref_tokens in ref.tokens.items():
        tokens = got.tokens[i]
        adapter = requests[i][2]
        assert len(tokens) == len(ref_tokens) == requests[i][1], (case.name, what, i)
        num_total += len(tokens)
        for t, (a, b) in enumerate(zip(tokens, ref_tokens)):
            lg, lr = got.logits[i][t], ref.logits[i][t]
            err = float((lg - lr).norm() / lr.norm())
            assert err < rel_tol, (
                f"{case.name} {what}: request {i} (adapter {adapter}) output {t}: logits "
                f"differ by {err:.2e} (relative), tolerance {rel_tol:.0e}")
            num_compared += 1
            worst = max(worst, err)
            if a != b:
                gap, margin = float(lr[b] - lr[a]), margin_frac * float(lr.std())
                assert gap < margin, (
                    f"{case.name} {what}: request {i} (adapter {adapter}) output {t}: token "
                    f"{a} vs reference {b}, whose logit leads by {gap:.3f} (> {margin:.3f})")
                break
    print(f"{case.name} {what}: {num_compared} of {num_total} outputs compared, "
          f"worst relative logits error {worst:.1e}")
    assert num_compared >= MIN_COMPARED * num_total, (
        f"{case.name} {what}: only {num_compared} of {num_total} outputs compared before the "
        "runs parted")


def test_graph_decode_gives_eager_and_cpu_tokens_with_mixed_adapters(setup):
    """13 requests over four adapters (ranks 2..64, attention / MLP / all targets) and none:
    CUDA graphs, eager CUDA and the CPU float32 engine agree, and the decode batches went
    through the graph buckets 16, 8, 4, 2 and 1."""
    requests = make_requests(setup.case, 13, [None] + [a.name for a in ADAPTERS], seed=1)
    gpu = make_engine(setup, "cuda")
    graphs = gpu.worker.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    with_graphs = run(gpu, requests)
    assert set(graphs.num_replays) >= {1, 2, 4, 8, 16}, dict(graphs.num_replays)
    assert graphs.num_mixed_replays, "the prefill steps replayed no mixed graph"
    gpu.worker.use_cuda_graphs = False
    replays = sum(graphs.num_replays.values()) + sum(graphs.num_mixed_replays.values())
    eager = run(gpu, requests)
    assert sum(graphs.num_replays.values()) + sum(graphs.num_mixed_replays.values()) == replays
    cpu = run(make_engine(setup, "cpu"), requests)
    assert_runs_agree(with_graphs, eager, "graphs-vs-eager", requests, setup.case)
    assert_runs_agree(with_graphs, cpu, "graphs-vs-cpu-fp32", requests, setup.case)
    assert_runs_agree(eager, cpu, "eager-vs-cpu-fp32", requests, setup.case)


def test_mixed_graphs_with_chunked_prompts_and_running_decodes(setup):
    """Prompts of 20..150 tokens arrive four at a time every two steps, so their chunks
    (64-token budget) share steps with decoding requests: every such step replays a mixed
    graph (buckets 16..64 tokens, padded to 16 requests) and its LoRA segments include the
    decode tokens, one each. Graphs, eager CUDA and the CPU engine agree; the adapters' sets
    of projections got graphs of their own."""
    requests = make_requests(setup.case, 13, [a.name for a in ADAPTERS] + [None], seed=3,
                             prompt_lens=(20, 150))
    gpu = make_engine(setup, "cuda")
    graphs = gpu.worker.graphs
    with_graphs = run(gpu, requests, per_wave=4)
    assert sum(graphs.num_mixed_replays.values()) >= 8, dict(graphs.num_mixed_replays)
    assert len(graphs.lora_sets) > 2, graphs.lora_sets
    gpu.worker.use_cuda_graphs = False
    eager = run(gpu, requests, per_wave=4)
    cpu = run(make_engine(setup, "cpu"), requests, per_wave=4)
    assert_runs_agree(with_graphs, eager, "graphs-vs-eager", requests, setup.case)
    assert_runs_agree(with_graphs, cpu, "graphs-vs-cpu-fp32", requests, setup.case)


def test_graph_decode_without_adapters_matches_cpu(setup):
    """Requests with no adapter replay the graphs captured without the LoRA kernels."""
    requests = make_requests(setup.case, 6, [None], seed=2)
    gpu = make_engine(setup, "cuda")
    with_graphs = run(gpu, requests)
    assert sum(gpu.worker.graphs.num_replays.values()) > 0
    cpu = run(make_engine(setup, "cpu"), requests)
    assert_runs_agree(with_graphs, cpu, "graphs-vs-cpu-fp32", requests, setup.case)


def test_no_cuda_graphs_flag_captures_none(setup):
    """Worker(cuda_graphs=False) captures nothing and still decodes."""
    from slora.worker.executor import Worker

    config = EngineConfig(
        model=model_config_from_folder(setup.model_path),
        pool=PoolConfig(num_pages=2048, max_adapter_slots=2, max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                  max_model_len=128),
        dtype="bfloat16", device="cuda")
    worker = Worker(config, setup.model_path, cuda_graphs=False)
    assert worker.graphs is None and not worker.use_cuda_graphs
