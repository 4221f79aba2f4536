"""One backend interface for the model's LoRA and attention, two implementations: torch
(the reference, any device) and CuPy (CUDA kernels, kernels/cuda_backend.py).

Token order in a step's batch, which the worker guarantees and the kernels rely on:
the decode tokens first (one per request, `num_decode_tokens` of them, MBGMV / decode
attention), then the prefill tokens, contiguous per request (MBGMM / prefill attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slora.kernels import torch_ref


@dataclass
class LoraBatch:
    """Which adapter each token of a step uses. Built once per step by the worker."""

    token_slots: torch.Tensor
    """[num_tokens] int32: adapter slot of each token, NO_ADAPTER (-1) for none."""
    num_decode_tokens: int
    """Tokens [0, num_decode_tokens) are decode tokens, one per request."""
    seg_starts: torch.Tensor
    """[num_segments + 1] int32: prefill segments (one adapter each) as token offsets."""
    seg_slots: torch.Tensor
    """[num_segments] int32: the adapter slot of each prefill segment."""
    any_lora: bool
    """False when no token uses an adapter: the LoRA path is skipped."""
    modules: frozenset[str] | None = None
    """The projections some token's adapter targets (the others skip LoRA); None: all of
    them, as a CUDA graph captures it."""


@dataclass(frozen=True)
class LoraGroup:
    """Projections that read the same input and write columns of one output (q, k and v
    into the fused qkv projection's output; gate and up): their LoRA runs as one group."""

    members: tuple[tuple[int, int, int], ...]
    """(module index, first column, width) of each member."""
    table: torch.Tensor
    """[num_members, 3] int32 on the device: `members`, for the kernels."""

    @property
    def max_d_out(self) -> int:
        return max(width for _, _, width in self.members)


@dataclass
class AttentionBatch:
    """Where each request's context lives. Built once per step by the worker."""

    kv_page_table: torch.Tensor
    """[num_reqs, max_pages] int32: page of each context position."""
    context_lens: torch.Tensor
    """[num_reqs] int32: context length after this step's tokens."""
    query_start_loc: torch.Tensor
    """[num_reqs + 1] int32: each request's new tokens in the batch."""
    token_page_ids: torch.Tensor
    """[num_tokens] int32: the page each new token's K/V is written to."""
    num_decode_reqs: int
    """Requests [0, num_decode_reqs) have one new token each (and come first)."""
    max_query_len: int
    max_context_len: int


class TorchBackend:
    """The reference kernels behind the backend interface."""

    name = "torch"

    def lora_shrink(self, x, pool, lora_page_table, lora_ranks, batch: LoraBatch):
        return torch_ref.lora_shrink(x, pool, lora_page_table, lora_ranks, batch.token_slots)

    def lora_expand(self, y, v, pool, lora_page_table, lora_ranks, lora_scales,
                    batch: LoraBatch):
        return torch_ref.lora_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales,
                                     batch.token_slots)

    def lora_group(self, y, x, pool, lora_page_table, lora_ranks, lora_scales,
                   group: LoraGroup, batch: LoraBatch, *, after_base_gemm: bool = False):
        """y[:, col:col + width] += each member's LoRA of x, in place (every module's
        tables: lora_page_table [num_modules, ...]). after_base_gemm: the last kernel on the
        stream is the GEMM that made y from x, so a backend may start behind it before it
        ends (it writes neither x, the tables nor the pool)."""
        for m, col, width in group.members:
            v = torch_ref.lora_shrink(x, pool, lora_page_table[m], lora_ranks[m],
                                      batch.token_slots)
            torch_ref.lora_expand(y[:, col:col + width], v, pool, lora_page_table[m],
                                  lora_ranks[m], lora_scales[m], batch.token_slots)
        return y

    def store_kv(self, k, v, pool, batch: AttentionBatch):
        torch_ref.store_kv(k, v, pool, batch.token_page_ids)

    def write_adapter_rows(self, pages, rows, page_ids, half: int):
        """pages [num_layers, num_pages, 2, H] (the whole pool): one module's A rows (half 0)
        or B^T rows (half 1) at every layer into their pages, zero-padded."""
        torch_ref.write_adapter_rows(pages, rows, page_ids, half)

    def add_rms_norm(self, h, delta, weight, eps: float):
        return torch_ref.add_rms_norm(h, delta, weight, eps)

    def rope_store_kv(self, qkv, positions, cos, sin_signed, pool, batch: AttentionBatch,
                      num_heads: int, num_kv_heads: int):
        return torch_ref.rope_store_kv(qkv, positions, cos, sin_signed, pool,
                                       batch.token_page_ids, num_heads, num_kv_heads)

    def silu_mul(self, gate_up):
        return torch_ref.silu_mul(gate_up)

    def paged_attention(self, q, pool, batch: AttentionBatch, num_kv_heads: int, scale: float):
        return torch_ref.paged_attention(q, pool, batch.kv_page_table, batch.context_lens,
                                         batch.query_start_loc, num_kv_heads, scale)


def get_backend(device: torch.device | str, prefer: str = "auto"):
    """CuPy kernels on CUDA when CuPy is importable (or `prefer="cuda"`), torch otherwise."""
    device = torch.device(device)
    if prefer == "torch" or device.type != "cuda":
        return TorchBackend()
    try:
        from slora.kernels.cuda_backend import CudaBackend
    except ImportError:
        if prefer == "cuda":
            raise
        return TorchBackend()
    return CudaBackend()
