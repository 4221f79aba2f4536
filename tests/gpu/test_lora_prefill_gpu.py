"""The prefill LoRA kernels (MBGMM: kernels/launchers/lora_prefill.py) against their torch
references, on shapes real models have, over segments of odd lengths (one adapter each), on
both tile sizes. Inputs, pools and tolerances as in test_lora_decode_gpu.py (helpers_gpu.py).
Marked `gpu`; skipped without CUDA or CuPy.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers_gpu import (DTYPES, GPU_ONLY, LLAMA2_7B, LORA_SHAPES, MAX_RANK, MODULE_CASES,
                         SEG_LENGTHS, assert_close, case_id, check_behind_gemm, group_dims,
                         make_group_pool, make_lora_pool, make_segments)
from slora.kernels import torch_ref
from slora.kernels.torch_ref import NO_ADAPTER

pytestmark = GPU_ONLY


@pytest.fixture(params=[64, 128], ids=lambda n: f"tile-{n}")
def mbgmm_tile(L, request):
    """Runs the test with the MBGMM shrink and expand on tiles of 64 and of 128 tokens (the
    launchers pick by the segments' average length)."""
    saved = L.routing.SHRINK_TILE, L.routing.EXPAND_TILE
    L.routing.SHRINK_TILE = L.routing.EXPAND_TILE = request.param
    yield request.param
    L.routing.SHRINK_TILE, L.routing.EXPAND_TILE = saved


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmm_group_pair_behind_the_gemm(L, gen, shape, dtype, mbgmm_tile):
    """lora_shrink_expand_segments for q, k, v (its expand launched behind its shrink)
    behind the fused qkv GEMM and behind itself (check_behind_gemm): an expand that read v
    before the shrink was done, or wrote y before the GEMM was, fails."""
    d_in, widths = group_dims(shape, "qkv")
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(0, SEG_LENGTHS, ranks.shape[1], gen)

    def lora(y, x):
        L.lora_shrink_expand_segments(y, x, pool, table, ranks, scales, seg_starts, seg_slots,
                                      group, max_d_out=max(widths))

    def delta(x, zeros):
        return torch_ref.lora_shrink_expand(zeros, x, pool, table, ranks, scales, token_slots,
                                            group)

    check_behind_gemm(gen, dtype, token_slots.shape[0], d_in, width, lora, delta,
                      f"{shape.name} qkv prefill segments, pair behind the GEMM")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,module", MODULE_CASES, ids=case_id)
def test_mbgmm_shrink_segments_matches_reference(L, gen, shape, module, dtype,
                                                 mbgmm_tile):
    """Prefill shrink on tensor cores over segments of odd lengths, one adapter each."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(5, SEG_LENGTHS, lp.ranks.shape[0], gen)
    x = torch.randn(token_slots.shape[0], d_in, device="cuda", generator=gen).to(dtype)
    out = L.lora_shrink_segments(x, lp.pool, lp.page_table, lp.ranks, seg_starts, seg_slots)
    ref = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, token_slots)
    assert_close(out, ref, torch.float32, f"{shape.name} {module} segment shrink")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,module", MODULE_CASES, ids=case_id)
def test_mbgmm_expand_segments_matches_reference(L, gen, shape, module, dtype,
                                                 mbgmm_tile):
    """Prefill expand on tensor cores; rows outside segments and no-adapter segments untouched."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(5, SEG_LENGTHS, lp.ranks.shape[0], gen)
    n = token_slots.shape[0]
    v = torch.randn(n, MAX_RANK, device="cuda", generator=gen)
    y0 = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand_segments(y, v, lp.pool, lp.page_table, lp.ranks, lp.scales, seg_starts,
                           seg_slots)
    ref = torch_ref.lora_expand(y0.clone(), v, lp.pool, lp.page_table, lp.ranks, lp.scales,
                                token_slots)
    assert_close(y, ref, dtype, f"{shape.name} {module} segment expand")
    untouched = token_slots == NO_ADAPTER
    assert torch.equal(y[untouched], y0[untouched])


MANY_SEG_LENGTHS = [(i * 37) % 23 + 2 for i in range(60)]
"""More segments than the launch has block rows: blocks loop over tiles."""


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("group_name", ["qkv", "gate_up"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmm_group_segments_match_reference(L, gen, shape, group_name, dtype,
                                              mbgmm_tile):
    """Prefill LoRA of a module group (q, k, v; gate, up) in one shrink and one expand launch:
    per-module ranks and scales, each member into its columns; no-adapter segments and the
    decode rows before the first segment untouched."""
    d_in, widths = group_dims(shape, group_name)
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    for lengths in (SEG_LENGTHS, MANY_SEG_LENGTHS):
        seg_starts, seg_slots, token_slots = make_segments(5, lengths, ranks.shape[1], gen)
        n = token_slots.shape[0]
        x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
        y0 = (torch.randn(n, width, device="cuda", generator=gen) * 0.01).to(dtype)
        y = y0.clone()
        L.lora_shrink_expand_segments(y, x, pool, table, ranks, scales, seg_starts, seg_slots,
                                      group, max_d_out=max(widths))
        ref = torch_ref.lora_shrink_expand(y0.clone(), x, pool, table, ranks, scales,
                                           token_slots, group)
        assert_close(y, ref, dtype, f"{shape.name} {group_name} group segments, "
                                    f"{len(lengths)} segments")
        untouched = token_slots == NO_ADAPTER
        assert torch.equal(y[untouched], y0[untouched])


def test_mbgmm_single_module_with_many_segments(L, gen, mbgmm_tile):
    """60 segments, more than the launch's block rows: the blocks loop over the tiles."""
    shape, dtype = LLAMA2_7B, torch.bfloat16
    d_in, d_out = shape.module_dims("q_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(3, MANY_SEG_LENGTHS, lp.ranks.shape[0],
                                                       gen)
    n = token_slots.shape[0]
    x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
    v = L.lora_shrink_segments(x, lp.pool, lp.page_table, lp.ranks, seg_starts, seg_slots)
    ref_v = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, token_slots)
    assert_close(v, ref_v, torch.float32, "many-segment shrink")
    y0 = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand_segments(y, ref_v, lp.pool, lp.page_table, lp.ranks, lp.scales, seg_starts,
                           seg_slots)
    ref = torch_ref.lora_expand(y0.clone(), ref_v, lp.pool, lp.page_table, lp.ranks,
                                lp.scales, token_slots)
    assert_close(y, ref, dtype, "many-segment expand")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_in,d_out,max_rank", [(600, 456, 131), (1800, 1000, 256)])
def test_mbgmm_ranks_past_one_tile_and_rows_across_pages(L, gen, d_in, d_out, max_rank, dtype,
                                                         mbgmm_tile):
    """Ranks past 128 (the shrink's second rank tile, the expand's second rank chunk), an odd
    max_rank (v rows not 8-byte aligned: scalar v reads and adds), and pages of H=200, so a
    stage of d_in and a step of d_out cross page boundaries; d_in 600 runs unsplit, 1800 split."""
    H, num_slots = 200, 6
    ranks = [1, 7, 130, max_rank, 0, 64]
    n = math.ceil(max(d_in, d_out) / H)
    num_pages = 2 * sum(ranks) * n + 7
    pool = (torch.randn(num_pages, 2, H, device="cuda", generator=gen) * 0.05).to(dtype)
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    table = torch.randint(0, num_pages, (num_slots, max_rank, n), device="cuda",
                          generator=gen, dtype=torch.int32)
    at = 0
    for slot, r in enumerate(ranks):
        table[slot, :r] = perm[at:at + r * n].view(r, n)
        at += r * n
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    scales = torch.rand(num_slots, device="cuda", generator=gen) * 1.5 + 0.5
    seg_starts, seg_slots, token_slots = make_segments(2, [70, 1, 130, 64, 9, 100, 33],
                                                       num_slots, gen)
    num_tokens = token_slots.shape[0]
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    v = L.lora_shrink_segments(x, pool, table, ranks_t, seg_starts, seg_slots)
    ref_v = torch_ref.lora_shrink(x, pool, table, ranks_t, token_slots)
    assert_close(v, ref_v, torch.float32, f"shrink d_in {d_in} max_rank {max_rank}")
    y0 = torch.randn(num_tokens, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand_segments(y, ref_v, pool, table, ranks_t, scales, seg_starts, seg_slots)
    ref = torch_ref.lora_expand(y0.clone(), ref_v, pool, table, ranks_t, scales, token_slots)
    assert_close(y, ref, dtype, f"expand d_out {d_out} max_rank {max_rank}")
    untouched = token_slots == NO_ADAPTER
    assert torch.equal(y[untouched], y0[untouched])
    group = torch.tensor([[0, 0, d_out]], dtype=torch.int32, device="cuda")
    y = y0.clone()
    L.lora_shrink_expand_segments(y, x, pool, table.unsqueeze(0), ranks_t.unsqueeze(0),
                                  scales.unsqueeze(0), seg_starts, seg_slots, group,
                                  max_d_out=d_out)
    ref = torch_ref.lora_shrink_expand(y0.clone(), x, pool, table.unsqueeze(0),
                                       ranks_t.unsqueeze(0), scales.unsqueeze(0), token_slots,
                                       group)
    assert_close(y, ref, dtype, f"shrink + expand d_in {d_in} max_rank {max_rank}")
