"""The torch reference kernels (kernels/torch_ref.py) behind the backend interface of
kernels/backend.py: the CPU path of the worker, and the oracle of the CUDA backend."""
from __future__ import annotations

from slora.kernels import torch_ref
from slora.kernels.backend import AttentionBatch, Backend, LoraBatch, LoraGroup, LoraTables


class TorchBackend(Backend):
    """Plain torch on any device; see Backend for each method's contract."""

    name = "torch"
    ops = torch_ref

    def lora_group(self, y, x, pool, tables: LoraTables, group: LoraGroup, batch: LoraBatch,
                   *, after_base_gemm: bool = False):
        for m, col, width in group.members:
            page_table, ranks, scales = tables.module(m)
            v = torch_ref.lora_shrink(x, pool, page_table, ranks, batch.token_slots)
            torch_ref.lora_expand(y[:, col:col + width], v, pool, page_table, ranks, scales,
                                  batch.token_slots)
        return y

    def lora_shrink(self, x, pool, tables: LoraTables, module: int, batch: LoraBatch):
        page_table, ranks, _ = tables.module(module)
        return torch_ref.lora_shrink(x, pool, page_table, ranks, batch.token_slots)

    def lora_expand(self, y, v, pool, tables: LoraTables, module: int, batch: LoraBatch):
        return torch_ref.lora_expand(y, v, pool, *tables.module(module), batch.token_slots)

    def paged_attention(self, q, pool, batch: AttentionBatch, num_kv_heads: int, scale: float,
                        *, sliding_window: int):
        return torch_ref.paged_attention(q, pool, batch.kv_page_table, batch.context_lens,
                                         batch.query_start_loc, num_kv_heads, scale,
                                         sliding_window=sliding_window)
