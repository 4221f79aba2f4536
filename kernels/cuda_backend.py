"""The CUDA kernels (kernels/cuda/, launched through kernels/launchers/) behind the backend
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
from slora.kernels.backend import AttentionBatch, Backend, LoraBatch, LoraGroup, LoraTables


class CudaBackend(Backend):
    """MBGMV / MBGMM LoRA and paged attention as CuPy RawModule CUDA kernels."""

    name = "cuda"
    ops = launchers

    def lora_group(self, y, x, pool, tables: LoraTables, group: LoraGroup, batch: LoraBatch,
                   *, after_base_gemm: bool = False):
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
        table, ranks, scales = tables.page_table, tables.ranks, tables.scales
        path = launchers.decode_lora_path(nd, len(group.members), pool.device.index)
        if nd and path == "fused":
            launchers.lora_shrink_expand(
                y[:nd], x[:nd], pool, table, ranks, scales, batch.token_slots[:nd], group.table,
                max_d_out=group.max_d_out, overlap_previous=after_base_gemm)
        elif nd and path == "one pass" and len(group.members) > 1:
            launchers.lora_decode_onepass_group(
                y[:nd], x[:nd], pool, table, ranks, scales, batch.token_slots[:nd], group.table,
                max_d_out=group.max_d_out, overlap_previous=after_base_gemm)
        elif nd and path == "group pair":
            launchers.lora_decode_group(
                y[:nd], x[:nd], pool, table, ranks, scales, batch.token_slots[:nd], group.table,
                max_d_out=group.max_d_out, overlap_previous=after_base_gemm)
        elif nd:
            (m, col, width), = group.members
            decode = (launchers.lora_decode_onepass if path == "one pass"
                      else launchers.lora_decode)
            decode(y[:nd, col:col + width], x[:nd], pool, *tables.module(m),
                   batch.token_slots[:nd], overlap_previous=after_base_gemm)
        if nd < num_tokens:
            launchers.lora_shrink_expand_segments(
                y, x, pool, table, ranks, scales, batch.seg_starts, batch.seg_slots,
                group.table, max_d_out=group.max_d_out)
        return y

    def lora_shrink(self, x, pool, tables: LoraTables, module: int, batch: LoraBatch):
        """Decode tokens by MBGMV, prefill segments by MBGMM (which adds its splits of d_in
        into zeroed rows)."""
        page_table, ranks, _ = tables.module(module)
        num_tokens, nd = x.shape[0], batch.num_decode_tokens
        if nd == num_tokens:
            return launchers.lora_shrink(x, pool, page_table, ranks, batch.token_slots)
        v = torch.empty(num_tokens, tables.max_rank, dtype=torch.float32, device=x.device)
        if nd:
            launchers.lora_shrink(x[:nd], pool, page_table, ranks, batch.token_slots[:nd],
                                  out=v[:nd])
        v[nd:].zero_()
        launchers.lora_shrink_segments(x, pool, page_table, ranks, batch.seg_starts,
                                       batch.seg_slots, out=v)
        return v

    def lora_expand(self, y, v, pool, tables: LoraTables, module: int, batch: LoraBatch):
        num_tokens, nd = y.shape[0], batch.num_decode_tokens
        if nd:
            launchers.lora_expand(y[:nd], v[:nd], pool, *tables.module(module),
                                  batch.token_slots[:nd])
        if nd < num_tokens:
            launchers.lora_expand_segments(y, v, pool, *tables.module(module),
                                           batch.seg_starts, batch.seg_slots)
        return y

    def paged_attention(self, q, pool, batch: AttentionBatch, num_kv_heads: int, scale: float,
                        *, sliding_window: int):
        """[num_tokens, num_heads, head_dim]: decode requests by the split-context kernel,
        the others by the causal tensor-core kernel."""
        num_reqs, nd = batch.context_lens.shape[0], batch.num_decode_reqs
        out = torch.empty_like(q)
        if nd:
            launchers.paged_attention_decode(
                q[:nd], pool, batch.kv_page_table[:nd], batch.context_lens[:nd], num_kv_heads,
                scale, sliding_window=sliding_window, max_context_len=batch.max_context_len,
                out=out[:nd])
        if nd < num_reqs:
            launchers.paged_attention(
                q, pool, batch.kv_page_table[nd:], batch.context_lens[nd:],
                batch.query_start_loc[nd:], num_kv_heads, scale,
                sliding_window=sliding_window, out=out)
        return out
