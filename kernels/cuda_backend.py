"""The CUDA kernels (kernels/cuda/, launched through kernels/launchers.py) behind the backend
interface of kernels/backend.py.

A step's batch holds the decode tokens first (one per request: MBGMV and decode attention),
then the prefill tokens, contiguous per request (MBGMM and prefill attention); see backend.py.
A decode-only batch runs as pure kernel launches with no host synchronisation, so a whole
decode step can be captured in a CUDA graph. Importing this module needs CuPy: get_backend()
falls back to the torch backend when the import fails.
"""
from __future__ import annotations

import torch

from slora.kernels import launchers
from slora.kernels.backend import AttentionBatch, LoraBatch, LoraGroup


class CudaBackend:
    """MBGMV / MBGMM LoRA and paged attention as CuPy RawModule CUDA kernels."""

    name = "cuda"

    def lora_shrink(self, x, pool, lora_page_table, lora_ranks, batch: LoraBatch):
        """v [num_tokens, max_rank] float32 = x @ A^T per token's adapter (0 past its rank)."""
        num_tokens, nd = x.shape[0], batch.num_decode_tokens
        if nd == num_tokens:
            return launchers.lora_shrink(x, pool, lora_page_table, lora_ranks, batch.token_slots)
        v = torch.empty(num_tokens, lora_page_table.shape[1], dtype=torch.float32,
                        device=x.device)
        if nd:
            launchers.lora_shrink(x[:nd], pool, lora_page_table, lora_ranks,
                                  batch.token_slots[:nd], out=v[:nd])
        v[nd:].zero_()  # the MBGMM blocks add their split of d_in into v
        launchers.lora_shrink_segments(x, pool, lora_page_table, lora_ranks, batch.seg_starts,
                                       batch.seg_slots, out=v)
        return v

    def lora_expand(self, y, v, pool, lora_page_table, lora_ranks, lora_scales,
                    batch: LoraBatch):
        """y += scale * v @ B^T per token's adapter, in place; returns y."""
        num_tokens, nd = y.shape[0], batch.num_decode_tokens
        if nd:
            launchers.lora_expand(y[:nd], v[:nd], pool, lora_page_table, lora_ranks, lora_scales,
                                  batch.token_slots[:nd])
        if nd < num_tokens:
            launchers.lora_expand_segments(y, v, pool, lora_page_table, lora_ranks, lora_scales,
                                           batch.seg_starts, batch.seg_slots)
        return y

    def lora_group(self, y, x, pool, lora_page_table, lora_ranks, lora_scales,
                   group: LoraGroup, batch: LoraBatch, *, after_base_gemm: bool = False):
        """y[:, col:col + width] += each member's LoRA of x, in place. Decode tokens: by the
        path launchers.decode_lora_path picks. "fused": the fused shrink + expand kernel, one
        launch for the group (see mbgmv_fused in lora_mbgmv.cu). "one pass": shrink and
        expand in one launch for the group, each block adding its rows' part into y
        (launchers.lora_decode_onepass_group; a single module: lora_decode_onepass).
        Otherwise MBGMV shrink then expand, the expand
        launched behind the shrink, one launch each for the whole group
        (launchers.lora_decode_group; a single module: launchers.lora_decode).
        Prefill segments: MBGMM, one shrink and one expand launch for the whole group, one
        module or several.
        after_base_gemm: the kernel just before is the GEMM that made y from x (Model.linear),
        so the decode launch may overlap its end (overlap_previous: it writes only y)."""
        num_tokens, nd = y.shape[0], batch.num_decode_tokens
        path = launchers.decode_lora_path(nd, len(group.members), pool.device.index)
        if nd and path == "fused":
            launchers.lora_shrink_expand(
                y[:nd], x[:nd], pool, lora_page_table, lora_ranks, lora_scales,
                batch.token_slots[:nd], group.table, max_d_out=group.max_d_out,
                overlap_previous=after_base_gemm)
        elif nd and path == "one pass" and len(group.members) > 1:
            launchers.lora_decode_onepass_group(
                y[:nd], x[:nd], pool, lora_page_table, lora_ranks, lora_scales,
                batch.token_slots[:nd], group.table, max_d_out=group.max_d_out,
                overlap_previous=after_base_gemm)
        elif nd and path == "group pair":
            launchers.lora_decode_group(
                y[:nd], x[:nd], pool, lora_page_table, lora_ranks, lora_scales,
                batch.token_slots[:nd], group.table, max_d_out=group.max_d_out,
                overlap_previous=after_base_gemm)
        elif nd:
            (m, col, width), = group.members
            decode = (launchers.lora_decode_onepass if path == "one pass"
                      else launchers.lora_decode)
            decode(y[:nd, col:col + width], x[:nd], pool, lora_page_table[m], lora_ranks[m],
                   lora_scales[m], batch.token_slots[:nd], overlap_previous=after_base_gemm)
        if nd < num_tokens:
            launchers.lora_shrink_expand_segments(
                y, x, pool, lora_page_table, lora_ranks, lora_scales, batch.seg_starts,
                batch.seg_slots, group.table, max_d_out=group.max_d_out)
        return y

    def store_kv(self, k, v, pool, batch: AttentionBatch):
        launchers.store_kv(k, v, pool, batch.token_page_ids)

    def write_adapter_rows(self, pages, rows, page_ids, half: int):
        """One launch per module and half, where torch's indexed copy of the same rows takes
        a zero-fill, a copy and several index kernels (a pool past 2^31 elements is split)."""
        launchers.write_adapter_rows(pages, rows, page_ids, half)

    def add_rms_norm(self, h, delta, weight, eps: float):
        return launchers.add_rms_norm(h, delta, weight, eps)

    def rope_store_kv(self, qkv, positions, cos, sin_signed, pool, batch: AttentionBatch,
                      num_heads: int, num_kv_heads: int):
        return launchers.rope_store_kv(qkv, positions, cos, sin_signed, pool,
                                       batch.token_page_ids, num_heads, num_kv_heads)

    def silu_mul(self, gate_up):
        return launchers.silu_mul(gate_up)

    def paged_attention(self, q, pool, batch: AttentionBatch, num_kv_heads: int, scale: float):
        """[num_tokens, num_heads, head_dim]: decode requests by the split-context kernel,
        the others by the causal tensor-core kernel."""
        num_reqs, nd = batch.context_lens.shape[0], batch.num_decode_reqs
        out = torch.empty_like(q)
        if nd:
            launchers.paged_attention_decode(
                q[:nd], pool, batch.kv_page_table[:nd], batch.context_lens[:nd], num_kv_heads,
                scale, max_context_len=batch.max_context_len, out=out[:nd])
        if nd < num_reqs:
            launchers.paged_attention(
                q, pool, batch.kv_page_table[nd:], batch.context_lens[nd:],
                batch.query_start_loc[nd:], num_kv_heads, scale, out=out)
        return out
