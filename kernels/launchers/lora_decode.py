"""Launchers of the decode LoRA kernels (MBGMV, cuda/lora_mbgmv.cu): one token per request,
each with its own adapter and rank. Shrink and expand (lora_shrink, lora_expand, their pair
lora_decode), the fused shrink + expand (lora_shrink_expand), the one-pass kernel
(lora_decode_onepass) and the group variants that serve q, k, v (or gate, up) in one launch.
Which of them a batch takes: routing.decode_lora_path.
"""
from __future__ import annotations

import math

import torch

from slora.kernels.cuda_compile import NULL, get_kernel, i32, i64, launch, ptr
from slora.kernels.launchers import routing
from slora.kernels.launchers.checks import (check_decode_group, check_expand, check_lora_tables,
                                            check_rows, check_same_tokens, check_scales,
                                            check_token_slots, check_v, vec_size)

MBGMV = "lora_mbgmv.cu"


def lora_shrink(x, pool, lora_page_table, lora_ranks, token_slots, *, out=None,
                _overlap_previous=False):
    """v[t, i] = x[t] @ A_{s}[i] for i < rank[s], s = token_slots[t]; 0 elsewhere.

    x [num_tokens, d_in]; pool [num_pages, 2, H]; returns v [num_tokens, max_rank] float32
    (written into `out` when given: every element is written).
    """
    check_rows("x", x, pool)
    num_tokens, d_in = x.shape
    H, num_slots, max_rank, ppr = check_lora_tables(pool, lora_page_table, lora_ranks, d_in, "d_in")
    check_token_slots(token_slots, pool, num_tokens)
    if out is None:
        out = torch.empty(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    check_v(out, pool, num_tokens, max_rank, "out")
    if num_tokens == 0 or max_rank == 0:
        return out
    _launch_mbgmv_shrink(x, pool, lora_page_table, lora_ranks, token_slots, out,
                         routing.overlap(_overlap_previous, pool.device.index))
    return out


def _group_args(group, table_stride: int) -> tuple:
    """The (group, table_stride) kernel arguments: null and 0 for one module."""
    return (NULL, i64(0)) if group is None else (ptr(group), i64(table_stride))


def _launch_mbgmv_shrink(x, pool, lora_page_table, lora_ranks, token_slots, v, overlap,
                         group=None):
    """mbgmv_shrink(_staged) over checked arguments: one module, or with `group` each
    member's (tables [num_modules, ...], v [num_tokens, members * max_rank])."""
    num_tokens, d_in = x.shape
    H, dev = pool.shape[2], pool.device.index
    num_slots, max_rank, ppr = lora_page_table.shape[-3:]
    num_members = 1 if group is None else group.shape[0]
    staged = routing.shrink_staged(num_tokens, H * pool.element_size())
    kernel = get_kernel(MBGMV, pool.dtype, "mbgmv_shrink_staged" if staged else "mbgmv_shrink",
                        dev)
    # Blocks loop over row pairs: enough of them to fill the GPU (~4 resident per SM), not
    # so many that most find only rows past the rank.
    row_groups = max(1, min(math.ceil(max_rank / 2),
                            math.ceil(4 * routing.num_sms(dev) / (num_tokens * num_members))))
    launch(kernel, (num_tokens, row_groups, num_members), (128,),
           (ptr(x), i64(x.stride(0)), ptr(pool), i32(H), ptr(lora_page_table), i32(num_slots),
            i32(max_rank), i32(ppr), ptr(lora_ranks), ptr(token_slots), ptr(v), i32(d_in),
            i32(overlap), *_group_args(group, num_slots * max_rank * ppr), i32(v.shape[1])),
           dev, shared_mem=H * pool.element_size() if staged else 0, pdl=overlap)


def _launch_mbgmv_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                         d_out, behind_shrink, group=None):
    """mbgmv_expand over checked arguments, as _launch_mbgmv_shrink (d_out: with `group`,
    the widest member's)."""
    num_tokens, H, dev = y.shape[0], pool.shape[2], pool.device.index
    num_slots, max_rank, ppr = lora_page_table.shape[-3:]
    num_members = 1 if group is None else group.shape[0]
    # A block covers one chunk of one page column, so its rows' page ids are the same.
    chunks_per_page = math.ceil(H / (128 * vec_size(pool.dtype)))
    launch(get_kernel(MBGMV, pool.dtype, "mbgmv_expand", dev),
           (num_tokens, math.ceil(d_out / H) * chunks_per_page, num_members), (128,),
           (ptr(y), i64(y.stride(0)), ptr(v), ptr(pool), i32(H), ptr(lora_page_table),
            i32(num_slots), i32(max_rank), i32(ppr), ptr(lora_ranks), ptr(lora_scales),
            ptr(token_slots), i32(d_out), i32(chunks_per_page),
            *_group_args(group, num_slots * max_rank * ppr), i32(v.shape[1])),
           dev, shared_mem=8 * max_rank, pdl=behind_shrink and routing.PDL)


def lora_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots, *,
                _behind_shrink=False):
    """y[t] += scale[s] * v[t, :r] @ B_{s}^T[:r], s = token_slots[t], in place; returns y.

    y [num_tokens, d_out] (model dtype); v [num_tokens, max_rank] float32.
    """
    num_tokens, d_out, H, num_slots, max_rank, ppr = check_expand(
        y, v, pool, lora_page_table, lora_ranks, lora_scales)
    check_token_slots(token_slots, pool, num_tokens, "y")
    if num_tokens == 0 or max_rank == 0 or d_out == 0:
        return y
    _launch_mbgmv_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                         d_out, _behind_shrink)
    return y


def lora_decode(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, *,
                v_out=None, overlap_previous=False):
    """y[t] += scale[s] * (x[t] @ A_s^T) @ B_s^T, s = token_slots[t], in place; returns y.

    MBGMV shrink then expand of one module (x [num_tokens, d_in], y [num_tokens, d_out]; v,
    the float32 [num_tokens, max_rank] between them, goes to `v_out` when given). The expand
    is launched behind the shrink with programmatic dependent launch: it loads y, its page
    ids and its first B^T rows while the shrink runs, and waits only for v. That is sound
    because the shrink lets it start only once everything before the shrink is complete.

    overlap_previous: launch the shrink behind the kernel before it too (Hopper), so the
    shrink reads the slots, ranks, page table and its first A rows while that kernel
    finishes, and waits for it before reading x or writing v. Only where that kernel writes
    none of token_slots, the tables and the pool, nor x (the worker: the base projection's
    GEMM, which writes y): what the shrink reads before its wait is not ordered after it.
    """
    v = lora_shrink(x, pool, lora_page_table, lora_ranks, token_slots, out=v_out,
                    _overlap_previous=overlap_previous)
    return lora_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                       _behind_shrink=True)


ONEPASS_ROWS = 4
"""Rows of one adapter a block of mbgmv_onepass takes per group (ONEPASS_RG in the source)."""


ONEPASS_THREADS = 256


ONEPASS_MAX_PARTS = 8
"""The most pieces (blocks) a token's delta is split into by lora_decode_onepass: y is rounded
once per piece, so this bounds its roundings (as many as the fused kernel's chunks)."""


def onepass_parts(num_tokens: int, max_rank: int, device_index: int,
                  num_members: int = 1) -> int:
    """lora_decode_onepass's default blocks per token and module: two resident blocks per SM
    over the batch's tokens and modules, at most one per group of ONEPASS_ROWS rows and at
    most ONEPASS_MAX_PARTS."""
    fill = max(1, 2 * routing.num_sms(device_index) // max(1, num_tokens * num_members))
    return max(1, min(fill, math.ceil(max_rank / ONEPASS_ROWS), ONEPASS_MAX_PARTS))


def _launch_onepass(y, x, pool, H, lora_page_table, num_slots, max_rank, ppr, lora_ranks,
                    lora_scales, token_slots, d_out, parts, overlap_previous, group=None):
    num_tokens, d_in = x.shape
    num_members = 1 if group is None else group.shape[0]
    dev = pool.device.index
    groups = math.ceil(max_rank / ONEPASS_ROWS)
    if parts is None:
        parts = onepass_parts(num_tokens, max_rank, dev, num_members)
    elif not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive int, got {parts!r}")
    parts = min(parts, groups)
    smem = math.ceil(groups / parts) * ONEPASS_ROWS * (ONEPASS_THREADS // 32 + 1) * 4
    launch(get_kernel(MBGMV, pool.dtype, "mbgmv_onepass", dev),
           (num_tokens, parts, num_members), (ONEPASS_THREADS,),
           (ptr(y), i64(y.stride(0)), ptr(x), i64(x.stride(0)), ptr(pool), i32(H),
            ptr(lora_page_table), i32(num_slots), i32(max_rank), i32(ppr), ptr(lora_ranks),
            ptr(lora_scales), ptr(token_slots), i32(d_in), i32(d_out),
            *_group_args(group, num_slots * max_rank * ppr)),
           dev, shared_mem=smem, pdl=routing.overlap(overlap_previous, dev))
    return y


def lora_decode_onepass(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, *,
                        parts=None, overlap_previous=False):
    """lora_decode's result in one launch where no block waits for another (mbgmv_onepass):
    `parts` blocks per token (default onepass_parts) each take every parts-th group of 4
    rows below the token's rank, compute their dot products with x and add the scaled sum of
    their B^T rows into y by vector reductions. y is rounded once per part; the parts land in
    any order (not bit-reproducible). overlap_previous: as lora_decode's (the first pool loads
    are issued before the wait, x and y are touched after it). Returns y."""
    num_tokens, d_in = check_same_tokens(y, x, pool)
    d_out = y.shape[1]
    H, num_slots, max_rank, ppr = check_lora_tables(pool, lora_page_table, lora_ranks,
                                                     max(d_in, d_out), "max(d_in, d_out)")
    check_scales(lora_scales, pool, num_slots)
    check_token_slots(token_slots, pool, num_tokens)
    if num_tokens == 0 or max_rank == 0 or d_out == 0:
        return y
    return _launch_onepass(y, x, pool, H, lora_page_table, num_slots, max_rank, ppr,
                           lora_ranks, lora_scales, token_slots, d_out, parts,
                           overlap_previous)


def lora_decode_onepass_group(y, x, pool, lora_page_table, lora_ranks, lora_scales,
                              token_slots, group, *, max_d_out, parts=None,
                              overlap_previous=False):
    """lora_shrink_expand's result by the one-pass kernel, one launch for the whole group
    (grid.z: the members; `parts` blocks per token and member, default onepass_parts over
    tokens x members). Arguments as lora_shrink_expand's; parts and rounding as
    lora_decode_onepass's. Returns y."""
    num_tokens, d_in, H, num_slots, max_rank, ppr = check_decode_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, group, max_d_out)
    if num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    return _launch_onepass(y, x, pool, H, lora_page_table, num_slots, max_rank, ppr,
                           lora_ranks, lora_scales, token_slots, max_d_out, parts,
                           overlap_previous, group)


FUSED_THREADS = 128


def lora_shrink_expand(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                       group, *, max_d_out, num_chunks=None, overlap_previous=False):
    """For each member (m, col, d_out) of group: y[:, col:col + d_out] += scale * (x @ A^T)
    @ B^T of module m, per token's adapter, in place, in one launch (v never leaves the
    block); returns y.

    y [num_tokens, width] and x [num_tokens, d_in] in the pool's dtype; lora_page_table
    [num_modules, num_slots, max_rank, pages_per_row]; lora_ranks, lora_scales [num_modules,
    num_slots]; group [num_members, 3] int32 on the device. `max_d_out`: the widest member
    (the grid's bound; the launcher does not read `group`). `num_chunks`: blocks per token
    and member, each computing the shrink and its share of the expand (default: as few as
    fill the GPU). overlap_previous: as lora_decode's (the kernel waits for the one before it
    before reading x or y; that one must write neither `group`, the tables nor the pool).
    """
    num_tokens, d_in, H, num_slots, max_rank, ppr = check_decode_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, group, max_d_out)
    if num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    dev = pool.device.index
    unit = FUSED_THREADS * vec_size(pool.dtype)
    max_units = math.ceil(max_d_out / H) * math.ceil(H / unit)
    if num_chunks is None:
        num_chunks = math.ceil(2 * routing.num_sms(dev) / (num_tokens * group.shape[0]))
    num_chunks = max(1, min(num_chunks, max_units))
    launch(get_kernel(MBGMV, pool.dtype, "mbgmv_fused", dev),
           (num_tokens, num_chunks, group.shape[0]), (FUSED_THREADS,),
           (ptr(y), i64(y.stride(0)), ptr(x), i64(x.stride(0)), ptr(pool), i32(H),
            ptr(lora_page_table), i32(num_slots), i32(max_rank), i32(ppr), ptr(lora_ranks),
            ptr(lora_scales), ptr(token_slots), ptr(group), i32(d_in)),
           dev, shared_mem=3 * max_rank * 4, pdl=routing.overlap(overlap_previous, dev))
    return y


def lora_decode_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                      group, *, max_d_out, overlap_previous=False):
    """lora_shrink_expand's result by lora_decode's two kernels, each one launch for the
    whole group (grid.z: the members): the shrink writes every member's v, the expand,
    launched behind it with programmatic dependent launch, adds each member's product into
    its columns of y. Below routing.FUSED_GROUP_MIN_TOKENS tokens this beats the fused kernel, which
    has each block recompute the token's shrink. Arguments as lora_shrink_expand's;
    overlap_previous as lora_decode's. Returns y."""
    num_tokens, d_in, H, num_slots, max_rank, ppr = check_decode_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, group, max_d_out)
    if num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    v = torch.empty(num_tokens, group.shape[0] * max_rank, dtype=torch.float32,
                    device=x.device)
    _launch_mbgmv_shrink(x, pool, lora_page_table, lora_ranks, token_slots, v,
                         routing.overlap(overlap_previous, pool.device.index), group)
    _launch_mbgmv_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                         max_d_out, True, group)
    return y
