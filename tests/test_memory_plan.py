"""The GPU rule's arithmetic (worker/memory_plan.py) with given memory figures, and the flags
that override it (worker/args.py); the measurement itself runs in tests/gpu."""
from __future__ import annotations

import argparse

import pytest
import torch

from slora.common.errors import ConfigError
from slora.worker.args import add_engine_args, engine_config_from_args
from slora.worker.memory_plan import (
    GRAPH_MARGIN, RESERVE_BYTES, MemoryFigures, batch_for_pool, plan_memory,
)
from slora.worker.sizing import CPU_MAX_NUM_SEQS

GIB = 2**30
PAGE_7B = 32 * 2 * 4096 * 2
"""A Llama-2-7B page in bf16: K and V of 4096 at 32 layers."""
TABLE_7B = 4 * 7 * (64 * 3 + 2)
"""Its LoRA tables per slot at rank 64: 7 modules x 64 rows x 3 pages, a rank and a scale."""
H100 = MemoryFigures(total=80 * GIB, free_at_start=79 * GIB,
                     free_after_probe=79 * GIB - 13 * GIB - 2 * GIB, weights=13 * GIB,
                     activations=2 * GIB, probe_tokens=2048)
"""An H100 with 1 GiB used by others; 13 GiB of weights; a dry run of a 2,048-token step
whose activations peaked at 2 GiB (and stayed reserved)."""


def plan(fig=H100, **kw):
    args = dict(utilization=0.9, page_bytes=PAGE_7B, table_bytes_per_slot=TABLE_7B,
                max_num_batched_tokens=4096, max_model_len=1024, logits_bytes=64 << 20,
                min_pages=1024 + 7 * 64 * 3)
    return plan_memory(fig, **{**args, **kw})


def test_pool_is_what_the_utilization_leaves_after_weights_activations_and_graphs():
    """0.9 x 80 GiB, less what this worker uses after the dry run (weights, activations;
    other processes' memory does not count against its share), the graphs' pool (1.25 x
    activations), the logits buffer, eager steps of 4,096 tokens (twice the dry run's 2,048:
    its activations once more) and the reserve; each page costs its bytes and a slot of
    LoRA tables."""
    p = plan()
    ours = H100.free_at_start - H100.free_after_probe  # 15 GiB
    budget = int(0.9 * 80 * GIB) - ours - int(GRAPH_MARGIN * 2 * GIB) - (64 << 20) \
        - 2 * GIB - RESERVE_BYTES
    assert p.num_pages == budget // (PAGE_7B + TABLE_7B)
    assert p.num_pages == 105_277  # about 52 GiB left for pages
    assert p.max_num_seqs == batch_for_pool(p.num_pages, 1024) == 200
    for figure in ("72.00 GiB", "weights 13.00 GiB", "activations 2.00 GiB",
                   "CUDA graphs 2.50 GiB", "105277 pages", "max_num_seqs 200"):
        assert figure in p.reason, (figure, p.reason)


def test_the_pool_never_takes_more_than_is_free():
    """Another process holds 40 GiB: the share (0.9 x 80 GiB) would allow more than is
    free, so the pool takes what is free less the graphs, the buffers and the reserve."""
    busy = MemoryFigures(80 * GIB, 40 * GIB, 25 * GIB, 13 * GIB, 2 * GIB, 2048)
    budget = 25 * GIB - int(GRAPH_MARGIN * 2 * GIB) - (64 << 20) - 2 * GIB - RESERVE_BYTES
    assert plan(busy).num_pages == budget // (PAGE_7B + TABLE_7B)


def test_the_batch_follows_the_pool_up_to_512():
    """Half of max_model_len a request, a multiple of 8, at most 512, at least 1."""
    assert batch_for_pool(110_000, 1024) == 208  # 214 requests of 512 pages
    assert batch_for_pool(110_000, 2048) == 104
    assert batch_for_pool(10_000_000, 1024) == 512
    assert batch_for_pool(3_000, 1024) == 5 and batch_for_pool(100, 1024) == 1
    assert plan(utilization=0.5).max_num_seqs < plan().max_num_seqs


def test_overrides_keep_the_users_numbers_and_say_so():
    p = plan(num_pages=50_000, max_num_seqs=256)
    assert (p.num_pages, p.max_num_seqs) == (50_000, 256)
    assert "as --num-pages/--pool-gib say" in p.reason and "as --max-num-seqs says" in p.reason
    assert plan(num_pages=50_000).max_num_seqs == batch_for_pool(50_000, 1024)


def test_too_little_memory_names_the_figures_and_the_need():
    full = MemoryFigures(80 * GIB, 20 * GIB, 5 * GIB, 13 * GIB, 2 * GIB, 2048)
    with pytest.raises(ConfigError, match=r"gets 0 pages .* needs 2368"):
        plan(full)
    with pytest.raises(ConfigError, match="gpu-memory-utilization must be in"):
        plan(utilization=1.5)


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_config_from_args(parser.parse_args(["--model", "dummy-tiny", *argv]))[0]


def test_pool_gib_sets_the_pool_and_the_cpu_keeps_its_batch():
    """--pool-gib gives the pages (a dummy-tiny page: 2 layers x 2 x 64 floats); nothing is
    left to measure; on the CPU the batch stays CPU_MAX_NUM_SEQS (worker/sizing.py) unless
    --max-num-seqs says."""
    config = parse("--device", "cpu", "--pool-gib", "0.01")
    assert config.pool.num_pages == int(0.01 * GIB) // (2 * 2 * 64 * 4)
    assert config.scheduler.max_num_seqs == CPU_MAX_NUM_SEQS and config.memory_sizing is None
    assert parse("--device", "cpu", "--max-num-seqs", "7").scheduler.max_num_seqs == 7
    with pytest.raises(ConfigError, match="gpu-memory-utilization must be in"):
        parse("--device", "cpu", "--gpu-memory-utilization", "0")
    with pytest.raises(ConfigError, match="--pool-gib must be positive"):
        parse("--device", "cpu", "--pool-gib", "-1")


def test_the_dry_run_runs_the_largest_steps_and_leaves_no_pool():
    """The dry run the GPU rule measures, on the CPU (the same code but for the memory
    readings): the largest mixed and decode steps over padding, with LoRA on every
    projection, on a tiny pool of one page; the worker is left without pool, inputs or
    graphs, ready to build its real ones."""
    from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
    from slora.models.registry import dummy_model_config
    from slora.worker.executor import Worker
    from slora.worker.memory_plan import dry_run

    config = EngineConfig(model=dummy_model_config("dummy-tiny"),
                          pool=PoolConfig(num_pages=256, max_lora_rank=8),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                    max_model_len=64))
    worker = Worker(config)
    called = []
    tokens = dry_run(worker, 32, lambda: called.append(worker.pool.num_pages))
    assert called == [1]  # measured from once the probe's buffers exist
    assert tokens == 32 + 64  # the mixed step: 32 decode rows beside 64 prefill tokens
    assert worker.pool is None and worker.inputs is None and worker.graphs is None


def _tp_dry_run_rank(rank: int, store_file: str, results) -> None:
    """One rank of a real two-process gloo group: builds its shard's Worker, runs the dry
    run beside the other rank (their forward passes hold the model's collectives) and takes
    the group's least of two figures."""
    import torch.distributed as dist

    from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
    from slora.models.registry import dummy_model_config
    from slora.worker.executor import Worker
    from slora.worker.memory_plan import dry_run
    from slora.worker.tp_group import TensorParallelGroup

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                            world_size=2)
    group = TensorParallelGroup(rank, 2, torch.device("cpu"), 30.0)
    config = EngineConfig(model=dummy_model_config("dummy-tiny"),
                          pool=PoolConfig(num_pages=256, max_lora_rank=8),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                    max_model_len=64),
                          tensor_parallel_size=2)
    worker = Worker(config, group=group)
    if rank:
        group.wait_ready()  # rank 0's constructor waits for it
    page_width = worker.pool.pages.shape[-1]
    tokens = dry_run(worker, 16, None)
    agreed = group.min_over_ranks([100 + rank, 50 - rank])
    results.put((rank, page_width, worker.shard.page_width, tokens, agreed,
                 worker.pool is None))
    dist.destroy_process_group()


def test_every_rank_of_a_tensor_parallel_group_runs_the_dry_run_over_its_shard(tmp_path):
    """What a tensor-parallel group does to size itself from memory (worker/memory_plan.py
    size_from_memory), on two real processes: each rank's dry run over a pool of its shard's
    page width, in step with the other's collectives, then the least of each figure over
    the ranks, the same on both."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_tp_dry_run_rank, args=(r, str(tmp_path / "store"), results))
             for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, pool_width, shard_width, tokens, agreed, no_pool in got:
        assert pool_width == shard_width == 32, (rank, pool_width, shard_width)  # of 64
        assert tokens == 16 + 64 and no_pool
        assert agreed == [100, 49]
