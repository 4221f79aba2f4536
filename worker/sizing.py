"""The CPU rule for the unified pool's size when no flag gives it, and the CPU's default
number of running requests. (On CUDA the pool is what --gpu-memory-utilization leaves after
the weights and the measured activations: worker/args.py and worker/memory_plan.py.)

CPU (`cpu_pool_sizing`): what the workload can use and no more. KV for max_num_seqs requests
of max_model_len tokens (a page holds one token's K and V at every layer), plus, for each of
those requests (up to the deprecated --max-adapter-slots), one adapter of the pool's highest
rank on every projection it may target (each running request may use another adapter). The
CPU pool's memory is taken from the kernel as it is first written (worker/pool.py), so an idle
worker's resident memory is its weights, not its pool. The result carries the sentence the
worker logs to say how the pool was sized.
"""
from __future__ import annotations

from dataclasses import dataclass

from slora.common.config import ModelConfig

CPU_MAX_NUM_SEQS = 4
"""Default --max-num-seqs on the CPU: a CPU runs a handful of requests at a useful speed."""


@dataclass(frozen=True)
class PoolSizing:
    num_pages: int
    reason: str
    """How num_pages was reached, for the worker's log."""


def page_bytes(model: ModelConfig, dtype: str, tensor_parallel_size: int = 1) -> int:
    """One page on one rank: a K and a V half at every layer, each the hidden size (with
    tensor parallelism, the widest rank's shard of it)."""
    import torch

    from slora.models.sharding import shard_plan

    n = tensor_parallel_size
    width = (model.hidden_size if n == 1 else
             max(shard_plan(model, rank, n).page_width for rank in range(n)))
    dtype_size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return model.num_layers * 2 * width * dtype_size


def cpu_pool_sizing(model: ModelConfig, *, max_lora_rank: int, max_model_len: int,
                    max_num_seqs: int, max_adapter_slots: int | None, dtype: str,
                    tensor_parallel_size: int = 1) -> PoolSizing:
    """`max_adapter_slots`: the deprecated cap on resident adapters (None: none)."""
    num_adapters = max_num_seqs if max_adapter_slots is None else min(max_num_seqs,
                                                                      max_adapter_slots)
    adapter_pages = model.adapter_num_pages({m: max_lora_rank for m in model.lora_modules})
    num_pages = max_num_seqs * max_model_len + num_adapters * adapter_pages
    mib = num_pages * page_bytes(model, dtype, tensor_parallel_size) / 2**20
    return PoolSizing(num_pages, (
        f"{num_pages} pages ({mib:.0f} MiB of {dtype}, taken as used): KV for --max-num-seqs "
        f"{max_num_seqs} x --max-model-len {max_model_len} tokens + {num_adapters} adapters "
        f"of --max-lora-rank {max_lora_rank} on all projections x {adapter_pages} pages"))
