"""Launchers of the prefill LoRA kernels (MBGMM, cuda/lora_mbgmm.cu): tensor-core tiles over
segments of tokens that share an adapter. `seg_starts` [num_segments + 1] int32 holds row
offsets into x / y / v (absolute, not relative to the first segment), `seg_slots`
[num_segments] int32 the slot of each: equivalent to the token variants of lora_decode.py
with token_slots[seg_starts[i]:seg_starts[i + 1]] = seg_slots[i]. fp32 pools have no
tensor-core path and take the per-token kernels (with a host sync: not for CUDA graphs).
"""
from __future__ import annotations

import math

import torch

from slora.kernels import torch_ref
from slora.kernels.cuda_compile import NULL, allow_dynamic_smem, get_kernel, i32, i64, launch, ptr
from slora.kernels.launchers import routing
from slora.kernels.launchers.checks import (check_expand, check_group, check_int,
                                            check_lora_tables, check_rows, check_segments,
                                            check_v)
from slora.kernels.launchers.lora_decode import lora_expand, lora_shrink

MBGMM = "lora_mbgmm.cu"


def _segment_token_slots(num_tokens, seg_starts, seg_slots):
    """token_slots equivalent to the segments (host sync: fp32 fallback only)."""
    slots = torch.full((num_tokens,), torch_ref.NO_ADAPTER, dtype=torch.int32,
                       device=seg_slots.device)
    starts = seg_starts.tolist()
    for i, slot in enumerate(seg_slots.tolist()):
        slots[starts[i]:starts[i + 1]] = slot
    return slots


MAX_EXTRA_TILE_ROWS = 8


SHRINK_RANK_TILE = 128
"""Rank columns of one MBGMM shrink block (mbgmm_shrink's GM_BN)."""


SHRINK_MIN_SPLIT = 512
"""The narrowest split of d_in an MBGMM shrink block takes."""


EXPAND_WAVES = 1.0
"""MBGMM expand blocks per resident slot the stripes aim at (shorter stripes above 1)."""


def _expand_launch(dev, pool, num_tokens, num_segs, d_out, num_members):
    """(kernel, grid, block, shared_mem) of an MBGMM expand over all members: mbgmm_expand
    (128-token tiles, 2 blocks of 96 KB per SM) where the segments average 128 tokens or more,
    else mbgmm_expand_64 (4 blocks of 56 KB). grid.x cuts the 64-column steps of d_out into
    equal stripes (the kernel derives the stripe width from grid.x) so that the blocks (tiles
    x stripes x members) make about one wave; grid.y: the tiles of the tokens plus one per
    segment up to MAX_EXTRA_TILE_ROWS (see _tile_rows)."""
    bm = routing.mbgmm_tile(routing.EXPAND_TILE, num_tokens, num_segs)
    # The kernel fits as many stages as the shared memory given here (%dynamic_smem_size).
    name, smem, per_sm = (("mbgmm_expand", 96 << 10, 2) if bm == 128
                          else ("mbgmm_expand_64", 56 << 10, 4))
    kernel = get_kernel(MBGMM, pool.dtype, name, dev)
    allow_dynamic_smem(kernel, smem, dev)
    tiles = _tile_rows(num_tokens, num_segs, bm)
    col_steps = math.ceil(d_out / 64)
    want = round(EXPAND_WAVES * per_sm * routing.num_sms(dev)
                 / (math.ceil(num_tokens / bm) * num_members))
    per_block = math.ceil(col_steps / max(1, min(col_steps, want)))
    return kernel, (math.ceil(col_steps / per_block), tiles, num_members), (2 * bm,), smem


def _tile_rows(num_tokens: int, num_segs: int, bm: int) -> int:
    """grid.y of the MBGMM kernels: the bm-token tiles of the tokens, plus one per segment
    (each may end in a partial tile) up to MAX_EXTRA_TILE_ROWS; blocks loop over the tiles
    past grid.y, so padding segments (a CUDA graph's) cost no blocks of their own."""
    return math.ceil(num_tokens / bm) + min(num_segs, MAX_EXTRA_TILE_ROWS)


def _shrink_launch(dev, pool, num_tokens, num_segs, d_in, max_rank, num_members):
    """(kernel, grid, block, shared_mem, k_split_len) of an MBGMM shrink over all members:
    mbgmm_shrink_128 (128-token tiles, 2 blocks of 96 KB per SM: each A row read once for
    twice the tokens) where the segments average 128 tokens or more, else mbgmm_shrink (64,
    4 blocks of 48 KB). d_in is split so that the blocks (tiles x rank tiles x members x
    splits) make about one wave; each split at least SHRINK_MIN_SPLIT wide, a multiple of 64."""
    bm = routing.mbgmm_tile(routing.SHRINK_TILE, num_tokens, num_segs)
    name, smem, per_sm = (("mbgmm_shrink_128", 96 << 10, 2) if bm == 128
                          else ("mbgmm_shrink", 48 << 10, 4))
    kernel = get_kernel(MBGMM, pool.dtype, name, dev)
    allow_dynamic_smem(kernel, smem, dev)
    rank_tiles = math.ceil(max_rank / SHRINK_RANK_TILE) * num_members
    want = per_sm * routing.num_sms(dev) / (math.ceil(num_tokens / bm) * rank_tiles)
    k_splits = max(1, min(math.ceil(want), d_in // SHRINK_MIN_SPLIT))
    k_split_len = math.ceil(d_in / k_splits / 64) * 64
    grid = (rank_tiles, _tile_rows(num_tokens, num_segs, bm), math.ceil(d_in / k_split_len))
    return kernel, grid, (2 * bm,), smem, k_split_len


def lora_shrink_segments(x, pool, lora_page_table, lora_ranks, seg_starts, seg_slots, *,
                         out=None):
    """v[t, i] = x[t] @ A_{s}[i] for the tokens t of each segment (s its slot), i < rank[s].

    x [num_tokens, d_in]; returns v [num_tokens, max_rank] float32, zeros outside the ranks
    and the segments. A given `out` must hold zeros in the segments' rows: the kernel splits
    d_in over blocks that add into v.
    """
    check_rows("x", x, pool)
    num_tokens, d_in = x.shape
    H, num_slots, max_rank, ppr = check_lora_tables(pool, lora_page_table, lora_ranks, d_in, "d_in")
    num_segs = check_segments(seg_starts, seg_slots, pool)
    if out is None:
        out = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    check_v(out, pool, num_tokens, max_rank, "out")
    if num_segs == 0 or num_tokens == 0 or max_rank == 0:
        return out
    if not routing.has_tensor_cores(pool.dtype):  # fp32: the per-token kernel
        slots = _segment_token_slots(num_tokens, seg_starts, seg_slots)
        v = lora_shrink(x, pool, lora_page_table, lora_ranks, slots)
        mask = slots != torch_ref.NO_ADAPTER
        out[mask] = v[mask]
        return out
    dev = pool.device.index
    kernel, grid, block, smem, k_split_len = _shrink_launch(dev, pool, num_tokens, num_segs,
                                                            d_in, max_rank, 1)
    launch(kernel, grid, block,
           (ptr(x), i64(x.stride(0)), ptr(pool), i32(H), ptr(lora_page_table), i32(num_slots),
            i32(max_rank), i32(ppr), ptr(lora_ranks), ptr(seg_starts), ptr(seg_slots),
            i32(num_segs), ptr(out), i32(d_in), i32(k_split_len), NULL, i32(1), i64(0),
            i32(max_rank)),
           dev, shared_mem=smem)
    return out


def lora_expand_segments(y, v, pool, lora_page_table, lora_ranks, lora_scales, seg_starts,
                         seg_slots):
    """y[t] += scale[s] * v[t, :r] @ B_{s}^T[:r] for the tokens t of each segment, in place.

    y [num_tokens, d_out] (model dtype); v [num_tokens, max_rank] float32; returns y.
    """
    num_tokens, d_out, H, num_slots, max_rank, ppr = check_expand(
        y, v, pool, lora_page_table, lora_ranks, lora_scales)
    num_segs = check_segments(seg_starts, seg_slots, pool)
    if num_segs == 0 or num_tokens == 0 or max_rank == 0 or d_out == 0:
        return y
    if not routing.has_tensor_cores(pool.dtype):
        slots = _segment_token_slots(num_tokens, seg_starts, seg_slots)
        return lora_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, slots)
    dev = pool.device.index
    kernel, grid, block, smem = _expand_launch(dev, pool, num_tokens, num_segs, d_out, 1)
    launch(kernel, grid, block,
           (ptr(y), i64(y.stride(0)), ptr(v), ptr(pool), i32(H), ptr(lora_page_table),
            i32(num_slots), i32(max_rank), i32(ppr), ptr(lora_ranks), ptr(lora_scales),
            ptr(seg_starts), ptr(seg_slots), i32(num_segs), i32(d_out),
            i32(max_rank % 4 == 0 and v.data_ptr() % 16 == 0), NULL, i64(0), i32(max_rank)),
           dev, shared_mem=smem)
    return y


def lora_shrink_expand_segments(y, x, pool, lora_page_table, lora_ranks, lora_scales,
                                seg_starts, seg_slots, group, *, max_d_out):
    """lora_shrink_expand for the tokens of each segment (s its slot): for each member (m,
    col, d_out) of group, y[t, col:col + d_out] += scale * (x[t] @ A^T) @ B^T of module m,
    in place, in two launches for the whole group (MBGMM shrink, then expand); returns y.

    Tables as lora_shrink_expand's ([num_modules, ...]); seg_starts, seg_slots as the other
    segment launchers'; group [num_members, 3] int32 on the device, `max_d_out` its widest
    member. The expand is launched behind the shrink with programmatic dependent launch
    (where routing.PDL and the GPU allow): its blocks take the SMs the shrink's last blocks leave,
    read their tables and first y and B^T tiles, and wait only to read v.
    """
    num_tokens, d_in, H, num_slots, max_rank, ppr = check_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, max_d_out)
    num_segs = check_segments(seg_starts, seg_slots, pool)
    check_int("group", group, pool, 2)
    num_members = group.shape[0]
    if group.shape[1] != 3 or not 1 <= num_members <= 65535:
        raise ValueError(f"group must be [num_members, 3], got {tuple(group.shape)}")
    if num_segs == 0 or num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    if not routing.has_tensor_cores(pool.dtype):  # fp32: the reference
        slots = _segment_token_slots(num_tokens, seg_starts, seg_slots)
        return torch_ref.lora_shrink_expand(y, x, pool, lora_page_table, lora_ranks,
                                            lora_scales, slots, group)
    dev = pool.device.index
    width = num_members * max_rank
    v = torch.zeros(num_tokens, width, dtype=torch.float32, device=x.device)
    kernel, grid, block, smem, k_split_len = _shrink_launch(dev, pool, num_tokens, num_segs,
                                                            d_in, max_rank, num_members)
    table_stride = num_slots * max_rank * ppr
    launch(kernel, grid, block,
           (ptr(x), i64(x.stride(0)), ptr(pool), i32(H), ptr(lora_page_table), i32(num_slots),
            i32(max_rank), i32(ppr), ptr(lora_ranks), ptr(seg_starts), ptr(seg_slots),
            i32(num_segs), ptr(v), i32(d_in), i32(k_split_len), ptr(group), i32(num_members),
            i64(table_stride), i32(width)),
           dev, shared_mem=smem)
    kernel, grid, block, smem = _expand_launch(dev, pool, num_tokens, num_segs, max_d_out,
                                               num_members)
    launch(kernel, grid, block,
           (ptr(y), i64(y.stride(0)), ptr(v), ptr(pool), i32(H), ptr(lora_page_table),
            i32(num_slots), i32(max_rank), i32(ppr), ptr(lora_ranks), ptr(lora_scales),
            ptr(seg_starts), ptr(seg_slots), i32(num_segs), i32(max_d_out),
            i32(max_rank % 4 == 0), ptr(group), i64(table_stride), i32(width)),
           dev, shared_mem=smem, pdl=routing.PDL)
    return y
