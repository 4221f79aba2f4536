"""The worker's step inputs (worker/batch.py) on the CPU: the persistent device page table
follows the scheduler's pages with only each step's new page ids, and steps padded to a
CUDA-graph bucket (decode batches to a number of requests, mixed steps to a number of decode
rows and of prefill tokens; padding on the scratch page and row) give their real rows the
tokens and logits of the unpadded steps.

Without a GPU there is no graph to capture; the padded step is run eagerly through the very
function a graph captures (`Worker._padded_forward`), which is what a replay re-executes.
tests/gpu/test_worker_gpu.py replays real graphs.
"""
from __future__ import annotations

import random

import pytest

from helpers_peft import make_peft_adapter, make_tiny_llama
from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.worker.cuda_graphs import DECODE, StepGraphs, bucket_sizes, mixed_bucket_sizes
from slora.models.registry import model_config_from_folder

MAX_NUM_SEQS = 8
MAX_NUM_BATCHED_TOKENS = 32
"""Mixed-step buckets 16 and 32 tokens."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=5)
    adapters = {
        "r4-attn": make_peft_adapter(base, str(root / "a"), r=4,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                     seed=1),
        "r8-mlp": make_peft_adapter(base, str(root / "b"), r=8,
                                    target_modules=["gate_proj", "up_proj", "down_proj"], seed=2),
    }
    return base, adapters


def make_engine(folders) -> Engine:
    base, adapters = folders
    config = EngineConfig(
        model=model_config_from_folder(base),
        pool=PoolConfig(num_pages=2048, max_adapter_slots=4, max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS,
                                  max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                                  max_model_len=128))
    engine = Engine(config, base)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def emulate_graphs(engine: Engine) -> StepGraphs:
    """Steps take the graph path (padded inputs, static buffers), each 'replay' running the
    captured step eagerly; 'capturing' a LoRA set pads the inputs as a capture does."""
    worker = engine.worker
    graphs = StepGraphs(frozenset(worker.config.model.lora_modules), MAX_NUM_SEQS,
                        MAX_NUM_BATCHED_TOKENS, worker.device)

    def replay(kind: str, size: int, modules: frozenset):
        (graphs.num_replays if kind == DECODE else graphs.num_mixed_replays)[size] += 1
        return worker._padded_forward(kind, size, modules)

    def capture(modules: frozenset):
        worker.inputs.write_padding()
        graphs.captured(modules, 0.0)

    graphs.replay, worker._capture = replay, capture
    worker.graphs, worker.use_cuda_graphs = graphs, True
    for modules in graphs.startup_sets():
        capture(modules)
    return graphs


def submit_all(engine: Engine, seed: int) -> list[str]:
    """7 requests with short prompts (prefilled in the first steps) and output lengths such
    that the decode batch shrinks 7, 6, 5 (bucket 8), 4, 3 (4), 2 (2), 1 (1)."""
    rng = random.Random(seed)
    adapters = [None, "r4-attn", "r8-mlp"]
    max_new = [3, 4, 5, 6, 8, 10, 12]
    rng.shuffle(max_new)
    return [engine.submit([rng.randrange(3, 250) for _ in range(rng.randint(2, 6))],
                          SamplingParams(max_new_tokens=n, ignore_eos=True), adapters[i % 3])
            for i, n in enumerate(max_new)]


def run_with_logits(engine: Engine, seed: int):
    engine.worker.keep_logits = True
    req_ids = submit_all(engine, seed)
    tokens = {r: [] for r in req_ids}
    logits = {r: [] for r in req_ids}
    while engine.has_unfinished():
        engine.worker.last_logits = {}
        for out in engine.step():
            tokens[out.req_id] += out.new_token_ids
        for r, lg in engine.worker.last_logits.items():
            logits[r].append(lg)
    return [tokens[r] for r in req_ids], [logits[r] for r in req_ids]


def test_bucket_sizes_cover_every_batch_up_to_the_largest():
    assert bucket_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert bucket_sizes(1) == [1]
    assert mixed_bucket_sizes(32) == [16, 32]
    assert mixed_bucket_sizes(300) == [16, 32, 64, 128, 256, 300]
    assert mixed_bucket_sizes(8192)[-1] == 2048  # larger steps run eagerly


def test_device_page_table_follows_the_scheduler_with_only_new_page_ids(folders):
    """After every step, each running request's row of the worker's page table holds the
    pages the scheduler gave its tokens, in position order."""
    engine = make_engine(folders)
    submit_all(engine, seed=3)
    checked = 0
    while engine.has_unfinished():
        engine.step()
        table = engine.worker.inputs.kv_page_table
        for req in engine.scheduler.running:
            state = engine.worker.requests.get(req.req_id)
            if state is None:
                continue
            n = state.num_computed_tokens
            assert table[state.row, :n].tolist() == req.page_ids[:n], req.req_id
            checked += 1
    assert checked > 10
    rows = [s.row for s in engine.worker.requests.values()]
    assert len(rows) == len(set(rows))


def test_padded_steps_give_the_unpadded_tokens_and_logits(folders):
    """Decode batches of 7 down to 1 requests, padded to buckets 8, 4, 2 and 1, and the
    prefill steps, padded to 8 decode rows and 16 or 32 prefill rows, give the same greedy tokens as
    eager steps, and logits within float32 rounding; the adapters' projections got a LoRA
    set of their own."""
    eager_tokens, eager_logits = run_with_logits(make_engine(folders), seed=4)
    engine = make_engine(folders)
    graphs = emulate_graphs(engine)
    padded_tokens, padded_logits = run_with_logits(engine, seed=4)
    assert set(graphs.num_replays) >= {8, 4, 2, 1}, dict(graphs.num_replays)
    # Mixed shapes (decode rows, prefill rows): the decode rows padded to max_num_seqs.
    assert {s for _, s in graphs.num_mixed_replays} & {16, 32}, dict(graphs.num_mixed_replays)
    assert {d for d, _ in graphs.num_mixed_replays} == {MAX_NUM_SEQS}
    assert len(graphs.lora_sets) > 2, graphs.lora_sets  # none, all, and the adapters' sets
    assert padded_tokens == eager_tokens
    for a, b in zip(padded_logits, eager_logits):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert float((x - y).abs().max()) < 1e-4
