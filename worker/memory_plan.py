"""The GPU rule: the unified pool and the largest batch sized from the device's memory, as
measured at start (`--gpu-memory-utilization`, default 0.9, the share of the GPU's total
memory this worker may use, as in vLLM: other processes' memory does not count against it,
but the pool never takes more than is free).

What the worker measures before it allocates the pool (`measure`): the free memory before
and after building the model (the weights, as loaded), and a dry run of the largest step the
worker will run, eagerly, over padding inputs with LoRA on every projection (its activation
peak from torch's allocator; cuBLAS and CuPy set-up show in the free memory after it). From
those figures the arithmetic (`plan_memory`, pure, tested on the CPU with given figures):

    ours    = free at start - free after the dry run         (weights, activations, set-up)
    budget  = min(utilization x total - ours, free after the dry run)
              - graphs - logits buffer - eager steps beyond the largest graph - reserve
    pages   = budget / (page bytes + LoRA table bytes per slot)   (one slot per page)
    batch   = min(512, pages / (max_model_len / 2)), a multiple of 8

`graphs`: every captured step shares one memory pool, captured from the largest shape down
(worker/cuda_graphs.py), and each writes its logits into one shared buffer, so the graphs
take about one largest step's activations: the dry run's peak, with a margin. Steps larger
than every graph run eagerly; their activations grow with their tokens past the dry run's.
The batch assumes a running request holds half of max_model_len on average: a larger batch
than the pool can keep would preempt and recompute. --num-pages / --pool-gib and
--max-num-seqs override either number; the worker logs the figures and the choice.

A tensor-parallel group: every rank measures its own GPU and plans for its shard (its page
width, its part of the weights), all of them running the dry run at once, and the group takes
the least pool and batch of any rank (`TensorParallelGroup.min_over_ranks`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from slora.common.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 2**30
MAX_NUM_SEQS = 512
"""The largest batch the rule picks (and the dry run's, when --max-num-seqs is not given)."""
CONTEXT_SHARE = 0.5
"""Share of max_model_len a running request is assumed to hold on average."""
GRAPH_MARGIN = 1.25
"""The graphs' shared pool, as a multiple of the dry run's activation peak."""
RESERVE_BYTES = GIB // 2
"""Left free for what nothing above counts (allocator rounding, sampling, adapter staging)."""
ALLOC_CONF = "expandable_segments:True"


def prefer_expandable_segments() -> None:
    """Sets PYTORCH_CUDA_ALLOC_CONF to expandable segments unless the user set it; call it
    before anything touches CUDA. Why: measured on the H100 (2026-11-24, bench/decode_step.py
    at batch 256), with the default allocator about 5 GiB of blocks freed by the eager
    warm-ups stayed reserved outside the CUDA graphs' pool and capture ran out of memory;
    with expandable segments the allocator hands that memory on and capture fits."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


@dataclass(frozen=True)
class MemoryFigures:
    """What the worker measured, in bytes."""

    total: int
    """The device's memory."""
    free_at_start: int
    """Free before this worker built anything (the rest is other processes')."""
    free_after_probe: int
    """Free after the weights were loaded and the dry run ran (its blocks stay reserved)."""
    weights: int
    """Free memory the model's weights took."""
    activations: int
    """Peak bytes torch allocated during the dry run, above what was allocated before."""
    probe_tokens: int
    """Tokens of the dry run's largest step."""


@dataclass(frozen=True)
class MemoryPlan:
    num_pages: int
    max_num_seqs: int
    reason: str
    """The figures and the rule that gave the numbers, for the worker's log."""


def batch_for_pool(num_pages: int, max_model_len: int) -> int:
    """The largest batch the pool keeps: num_pages / (max_model_len x CONTEXT_SHARE), at
    most MAX_NUM_SEQS, rounded down to a multiple of 8 when that leaves at least 8."""
    per_request = max(1, int(max_model_len * CONTEXT_SHARE))
    n = min(MAX_NUM_SEQS, max(1, num_pages // per_request))
    return n - n % 8 if n >= 8 else n


def plan_memory(fig: MemoryFigures, *, utilization: float, page_bytes: int,
                table_bytes_per_slot: int, max_num_batched_tokens: int, max_model_len: int,
                logits_bytes: int, min_pages: int, num_pages: int | None = None,
                max_num_seqs: int | None = None) -> MemoryPlan:
    """The pool's pages and the largest batch from measured figures (see the module
    docstring). `num_pages` / `max_num_seqs`: the user's override of either; `min_pages`:
    one request of max_model_len with the largest adapter, refused below it."""
    if not 0.0 < utilization <= 1.0:
        raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    others = fig.total - fig.free_at_start
    ours = fig.free_at_start - fig.free_after_probe
    graphs = int(fig.activations * GRAPH_MARGIN)
    eager_extra = 0
    if max_num_batched_tokens > fig.probe_tokens and fig.probe_tokens > 0:
        eager_extra = int(fig.activations * (max_num_batched_tokens / fig.probe_tokens - 1))
    allowed = int(utilization * fig.total)
    budget = min(allowed - ours, fig.free_after_probe) - graphs - logits_bytes - eager_extra \
        - RESERVE_BYTES
    per_page = page_bytes + table_bytes_per_slot
    figures = (f"{utilization:.2f} of {g(fig.total)} = {g(allowed)}; other processes "
               f"{g(others)}; ours after the dry run {g(ours)}: weights {g(fig.weights)} "
               f"(measured), dry run of a "
               f"{fig.probe_tokens}-token step: activations {g(fig.activations)} (+ "
               f"{g(eager_extra)} for eager steps up to {max_num_batched_tokens} tokens), "
               f"CUDA graphs {g(graphs)} (estimated: one shared pool, {GRAPH_MARGIN}x the "
               f"activations), logits buffer {g(logits_bytes)}, reserve {g(RESERVE_BYTES)}")
    if num_pages is None:
        num_pages = max(0, budget) // per_page
        pool_why = (f"{num_pages} pages: {g(max(0, budget))} left, at {page_bytes} bytes a "
                    f"page + {table_bytes_per_slot} of LoRA tables (one slot per page)")
    else:
        pool_why = f"{num_pages} pages, as --num-pages/--pool-gib say"
    if num_pages < min_pages:
        raise ConfigError(
            f"the pool gets {num_pages} pages ({figures}), but one request of max_model_len "
            f"{max_model_len} with an adapter of the highest rank needs {min_pages}: raise "
            "--gpu-memory-utilization, or lower --max-model-len or --max-lora-rank")
    if max_num_seqs is None:
        max_num_seqs = batch_for_pool(num_pages, max_model_len)
        batch_why = (f"max_num_seqs {max_num_seqs}: the pool over {CONTEXT_SHARE} x "
                     f"max_model_len {max_model_len} a request, at most {MAX_NUM_SEQS}")
    else:
        batch_why = f"max_num_seqs {max_num_seqs}, as --max-num-seqs says"
    return MemoryPlan(num_pages, max_num_seqs,
                      f"memory plan: {figures}; {pool_why}; {batch_why}")


def dry_run(worker, probe_max_num_seqs: int, measure_from=None) -> int:
    """Runs the largest mixed and the largest decode step eagerly, with LoRA on every
    projection, on a worker whose model is built and whose pool is not: a pool of one page
    (padding writes only the scratch page; of the rank's shard, `worker.shard`, with tensor
    parallelism), the step inputs and graph shapes at `probe_max_num_seqs`. Every rank of a
    tensor-parallel group runs it at once (its forward passes hold the model's
    collectives), with the same shapes: the same config. `measure_from()` is called once
    they are allocated, just before the steps run. Leaves the worker without pool, inputs or graphs; returns the tokens of
    the larger step. Any device (a CPU test runs it)."""
    import torch

    from slora.common.config import PoolConfig
    from slora.worker.batch import StepInputs
    from slora.worker.cuda_graphs import StepGraphs
    from slora.worker.pool import UnifiedPool

    device, cfg, sched = worker.device, worker.config.model, worker.config.scheduler
    worker.pool = UnifiedPool(cfg, PoolConfig(num_pages=1,
                                              max_lora_rank=worker.config.pool.max_lora_rank),
                              worker.dtype, device, worker.backend, worker.shard)
    worker.inputs = StepInputs(probe_max_num_seqs, sched.max_num_batched_tokens,
                               sched.max_model_len, worker.pool.scratch_page, device)
    worker.graphs = StepGraphs(frozenset(cfg.lora_modules),
                               min(probe_max_num_seqs, sched.max_num_batched_tokens),
                               sched.max_num_batched_tokens, device)
    shapes = worker.graphs.shapes()  # largest first
    largest = [shapes[0], next(s for s in shapes if s[0] != shapes[0][0])]
    worker.inputs.write_padding()
    if measure_from is not None:
        measure_from()
    try:
        with torch.inference_mode():
            for kind, size in largest:
                logits = worker._padded_forward(kind, size, frozenset(cfg.lora_modules))
                assert logits.shape[1] == cfg.vocab_size, tuple(logits.shape)
                del logits
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    finally:
        worker.pool = worker.inputs = worker.graphs = None
    return max(s if isinstance(s, int) else sum(s) for _, s in largest)


def measure(worker, free_at_start: int, probe_max_num_seqs: int) -> MemoryFigures:
    """The figures of `plan_memory`, from the free memory before the model (`free_at_start`),
    after it, and after the dry run (`dry_run`), whose activation peak comes from torch's
    allocator."""
    import torch

    device = worker.device
    free_after_load, total = torch.cuda.mem_get_info(device)
    before = []

    def measure_from():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before.append(torch.cuda.memory_allocated(device))

    probe_tokens = dry_run(worker, probe_max_num_seqs, measure_from)
    activations = torch.cuda.max_memory_allocated(device) - before[0]
    free_after_probe, _ = torch.cuda.mem_get_info(device)
    return MemoryFigures(total, free_at_start, free_after_probe,
                         max(0, free_at_start - free_after_load), activations, probe_tokens)


def size_from_memory(worker, free_at_start: int) -> MemoryPlan:
    """Measures (`measure`), plans (`plan_memory`) and writes the plan into the worker's
    config (pool pages, max_num_seqs), which the scheduler then reads from its Info. Each
    rank of a tensor-parallel group measures its own GPU and plans for its shard (its
    pages, its share of the weights); the group then takes the smallest pool and batch of
    any rank, since a page id names the same slot on every rank."""
    import torch

    from slora.worker.pool import UnifiedPool

    config, group = worker.config, worker.group
    sizing, cfg, sched = config.memory_sizing, config.model, config.scheduler
    n = 1 if group is None else group.size
    probe_seqs = MAX_NUM_SEQS if sizing.size_batch else sched.max_num_seqs
    fig = measure(worker, free_at_start, probe_seqs)
    dtype_size = torch.empty((), dtype=worker.dtype).element_size()
    page_bytes = cfg.num_layers * 2 * UnifiedPool.page_width(cfg, worker.shard) * dtype_size
    min_pages = sched.max_model_len + cfg.adapter_num_pages(
        {m: config.pool.max_lora_rank for m in cfg.lora_modules})
    plan = plan_memory(
        fig, utilization=sizing.gpu_memory_utilization, page_bytes=page_bytes,
        table_bytes_per_slot=UnifiedPool.table_bytes_per_slot(cfg, config.pool.max_lora_rank,
                                                              n),
        max_num_batched_tokens=sched.max_num_batched_tokens, max_model_len=sched.max_model_len,
        logits_bytes=4 * probe_seqs * cfg.vocab_size, min_pages=min_pages,
        max_num_seqs=None if sizing.size_batch else sched.max_num_seqs)
    log.info(plan.reason)
    if group is not None:
        num_pages, max_num_seqs = group.min_over_ranks([plan.num_pages, plan.max_num_seqs])
        plan = MemoryPlan(num_pages, max_num_seqs,
                          f"{plan.reason}; the group's (the least of its {n} ranks): "
                          f"{num_pages} pages, max_num_seqs {max_num_seqs}")
        if group.rank == 0:
            log.info("memory plan of the tensor-parallel group: %d pages, max_num_seqs %d "
                     "(the least of its %d ranks)", num_pages, max_num_seqs, n)
    config.pool.num_pages = plan.num_pages
    config.scheduler.max_num_seqs = plan.max_num_seqs
    config.memory_sizing = None  # done: the config now says what was chosen
    config.check()
    return plan


def pool_pages_for_bytes(pool_bytes: float, page_bytes: int) -> int:
    """--pool-gib in pages."""
    return int(math.floor(pool_bytes / page_bytes))
