"""The decode LoRA kernels (MBGMV: kernels/launchers/lora_decode.py) against their torch
references, on shapes real models have; test_lora_prefill_gpu.py has the MBGMM ones.

Every test draws fresh random inputs (never zeros), scatters the pool's pages with a random
permutation so nothing is contiguous, mixes ranks 1..128, a slot whose module is not targeted
(rank 0) and tokens with no adapter in one batch, and poisons outputs with NaN before the run so
an element the kernel forgot fails. Errors are ||out - ref|| / ||ref|| against a tolerance looked
up by dtype. Marked `gpu`: run with `pytest -m gpu`; skipped without CUDA or CuPy (importing
this module needs neither).
"""
from __future__ import annotations

import pytest
import torch

from helpers_gpu import (DTYPES, GPU_ONLY, LLAMA2_7B, LLAMA2_13B, LLAMA3_8B, LORA_SHAPES,
                         MAX_RANK, MODULE_CASES, QWEN3_06B, QWEN25_7B, TOL, assert_close,
                         capture, case_id, check_behind_gemm, group_dims, make_group_pool,
                         make_lora_pool, make_token_slots)
from slora.kernels import torch_ref
from slora.kernels.torch_ref import NO_ADAPTER

pytestmark = GPU_ONLY


@pytest.mark.parametrize("num_tokens", [13, 64])  # mbgmv_shrink; mbgmv_shrink_staged
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,module", MODULE_CASES, ids=case_id)
def test_mbgmv_shrink_matches_reference(L, gen, shape, module, dtype, num_tokens):
    """Decode shrink: mixed ranks, no-adapter tokens, rank-0 slot; every v element written."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    out = torch.full((num_tokens, MAX_RANK), float("nan"), device="cuda")
    L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots, out=out)
    ref = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots)
    # bf16/fp16 products are exact in float32: only the order of the sums differs.
    assert_close(out, ref, torch.float32, f"{shape.name} {module} shrink")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,module", MODULE_CASES, ids=case_id)
def test_mbgmv_expand_matches_reference(L, gen, shape, module, dtype):
    """Decode expand accumulates into y in place and leaves no-adapter rows untouched."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(64, lp.ranks.shape[0], gen)
    v = torch.randn(64, MAX_RANK, device="cuda", generator=gen)
    y0 = torch.randn(64, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand(y, v, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    ref = torch_ref.lora_expand(y0.clone(), v, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    assert_close(y, ref, dtype, f"{shape.name} {module} expand")
    untouched = (slots == NO_ADAPTER) | (lp.ranks[slots.clamp_min(0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,module", MODULE_CASES, ids=case_id)
def test_mbgmv_decode_pair_matches_reference(L, gen, shape, module, dtype):
    """lora_decode: the shrink prefetching B^T into L2 and the expand launched behind it with
    programmatic dependent launch (Hopper) give the reference's y, eagerly and replayed from a
    CUDA graph on new inputs (an expand that read v before its shrink wrote it would keep the
    previous replay's v)."""
    from slora.kernels.cuda_compile import pdl_available
    if torch.cuda.get_device_capability()[0] >= 9:
        assert pdl_available(torch.cuda.current_device())
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(64, lp.ranks.shape[0], gen)
    x = torch.randn(64, d_in, device="cuda", generator=gen).to(dtype)
    y0 = torch.randn(64, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_decode(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    ref = torch_ref.lora_expand(y0.clone(), torch_ref.lora_shrink(
        x, lp.pool, lp.page_table, lp.ranks, slots), lp.pool, lp.page_table, lp.ranks,
        lp.scales, slots)
    assert_close(y, ref, dtype, f"{shape.name} {module} decode pair")
    untouched = (slots == NO_ADAPTER) | (lp.ranks[slots.clamp_min(0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])

    def step():
        y.copy_(y0)
        L.lora_decode(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)

    graph = capture(step)
    for replay in range(3):
        x.copy_(torch.randn(64, d_in, device="cuda", generator=gen).to(dtype))
        y.fill_(float("nan"))
        graph.replay()
        ref = torch_ref.lora_expand(y0.clone(), torch_ref.lora_shrink(
            x, lp.pool, lp.page_table, lp.ranks, slots), lp.pool, lp.page_table, lp.ranks,
            lp.scales, slots)
        assert_close(y, ref, dtype, f"{shape.name} {module} decode pair, graph replay {replay}")


def reference_delta(lp, slots):
    """delta(x, y): the reference's LoRA of x added into y, in place (check_behind_gemm
    passes zeros)."""
    def delta(x, y):
        return torch_ref.lora_expand(y, torch_ref.lora_shrink(
            x, lp.pool, lp.page_table, lp.ranks, slots), lp.pool, lp.page_table, lp.ranks,
            lp.scales, slots)
    return delta


@pytest.mark.parametrize("num_tokens", [13, 64])  # mbgmv_shrink; mbgmv_shrink_staged
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", ["q_proj", "k_proj", "down_proj"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_decode_pair_overlapping_the_kernel_before(L, gen, shape, module, dtype,
                                                         num_tokens):
    """lora_decode(overlap_previous=True) behind the base GEMM and behind itself, on one v
    buffer (check_behind_gemm)."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)
    v = torch.empty(num_tokens, lp.page_table.shape[1], device="cuda")

    def lora(y, x):
        L.lora_decode(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots, v_out=v,
                      overlap_previous=True)

    delta = reference_delta(lp, slots)

    check_behind_gemm(gen, dtype, num_tokens, d_in, d_out, lora, delta,
                      f"{shape.name} {module} {num_tokens} tokens, pair behind the GEMM", v)


def check_onepass(L, gen, shape, module, dtype, num_tokens, parts=None):
    """lora_decode_onepass against the reference: mixed ranks, no-adapter tokens and a
    rank-0 slot left exactly as they were, no element far off."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    # Small y: the output is mostly the LoRA delta, so a row group left out shows.
    y0 = (torch.randn(num_tokens, d_out, device="cuda", generator=gen) * 0.01).to(dtype)
    y = y0.clone()
    L.lora_decode_onepass(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots,
                          parts=parts)
    ref = reference_delta(lp, slots)(x, y0.clone())
    what = f"{shape.name} {module} {num_tokens} tokens one pass, parts {parts}"
    assert_close(y, ref, dtype, what)
    worst = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert worst < 2 * TOL[dtype], f"{what}: an element is off by {worst:.2e} of the largest"
    untouched = (slots == NO_ADAPTER) | (lp.ranks[slots.clamp_min(0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])


@pytest.mark.parametrize("num_tokens", [13, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,module", MODULE_CASES, ids=case_id)
def test_mbgmv_onepass_matches_reference(L, gen, shape, module, dtype, num_tokens):
    """Decode shrink and expand in one launch (mbgmv_onepass: each block adds its rows'
    part into y by vector reductions)."""
    check_onepass(L, gen, shape, module, dtype, num_tokens)


@pytest.mark.parametrize("parts", [1, 3, 8, 1000])
def test_mbgmv_onepass_any_number_of_parts(L, gen, parts):
    """Whatever the blocks per token (1: one block takes every row group; 3: blocks with
    different numbers of groups; 1000: clamped to one block per group of 4 rows), the result
    is the same; also for the fp32 pool, the 13B shapes (H = 5120, down's d_in 13824 over
    three page columns) and Qwen3-0.6B's o_proj (d_in twice H). Beyond ONEPASS_MAX_PARTS,
    y's roundings (one per part) add up past bf16's tolerance for rank 128, so 1000 is
    checked with the fp32 pool only."""
    if parts <= 8:
        check_onepass(L, gen, LLAMA2_7B, "q_proj", torch.bfloat16, 13, parts)
        check_onepass(L, gen, LLAMA2_13B, "down_proj", torch.float16, 13, parts)
        check_onepass(L, gen, QWEN3_06B, "o_proj", torch.bfloat16, 13, parts)
    check_onepass(L, gen, LLAMA3_8B, "up_proj", torch.float32, 13, parts)
    check_fused(L, gen, LLAMA3_8B, "qkv", torch.float32, 13, parts, how="one pass")


@pytest.mark.parametrize("num_tokens", [13, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", ["q_proj", "k_proj", "down_proj"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_onepass_overlapping_the_kernel_before(L, gen, shape, module, dtype,
                                                     num_tokens):
    """lora_decode_onepass(overlap_previous=True) behind the base GEMM and behind itself
    (check_behind_gemm): a block that added into y before the GEMM wrote it, or read x
    before the kernel making it was done, fails."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)

    def lora(y, x):
        L.lora_decode_onepass(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots,
                              overlap_previous=True)

    delta = reference_delta(lp, slots)

    check_behind_gemm(gen, dtype, num_tokens, d_in, d_out, lora, delta,
                      f"{shape.name} {module} {num_tokens} tokens, one pass behind the GEMM")


@pytest.mark.parametrize("num_tokens", [13, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("pair", [False, True], ids=["fused", "group-pair"])
def test_mbgmv_fused_overlapping_the_kernel_before(L, gen, shape, dtype, num_tokens, pair):
    """lora_shrink_expand and lora_decode_group (overlap_previous=True) for q, k, v behind
    the fused qkv GEMM and behind themselves (check_behind_gemm)."""
    d_in, widths = group_dims(shape, "qkv")
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    slots = make_token_slots(num_tokens, ranks.shape[1], gen)
    launcher = L.lora_decode_group if pair else L.lora_shrink_expand

    def lora(y, x):
        launcher(y, x, pool, table, ranks, scales, slots, group, max_d_out=max(widths),
                 overlap_previous=True)

    def delta(x, zeros):
        return torch_ref.lora_shrink_expand(zeros, x, pool, table, ranks, scales, slots, group)

    what = "group pair" if pair else "fused"
    check_behind_gemm(gen, dtype, num_tokens, d_in, width, lora, delta,
                      f"{shape.name} qkv {num_tokens} tokens, {what} behind the GEMM")


def check_fused(L, gen, shape, group_name, dtype, num_tokens, num_chunks=None, how="fused"):
    """lora_shrink_expand (how="fused"; num_chunks: its blocks per token), lora_decode_group
    ("group pair") or lora_decode_onepass_group ("one pass"; num_chunks: its parts) against
    the reference."""
    d_in, widths = group_dims(shape, group_name)
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    slots = make_token_slots(num_tokens, ranks.shape[1], gen)
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    # Small y: the output is mostly the LoRA delta, so a delta left out shows.
    y0 = (torch.randn(num_tokens, width, device="cuda", generator=gen) * 0.01).to(dtype)
    y = y0.clone()
    if how == "group pair":
        L.lora_decode_group(y, x, pool, table, ranks, scales, slots, group,
                            max_d_out=max(widths))
    elif how == "one pass":
        L.lora_decode_onepass_group(y, x, pool, table, ranks, scales, slots, group,
                                    max_d_out=max(widths), parts=num_chunks)
    else:
        L.lora_shrink_expand(y, x, pool, table, ranks, scales, slots, group,
                             max_d_out=max(widths), num_chunks=num_chunks)
    ref = torch_ref.lora_shrink_expand(y0.clone(), x, pool, table, ranks, scales, slots, group)
    what = f"{shape.name} {group_name} {how}, {num_tokens} tokens, chunks {num_chunks}"
    assert_close(y, ref, dtype, what)
    worst = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert worst < 2 * TOL[dtype], f"{what}: an element is off by {worst:.2e} of the largest"
    assert torch.equal(y[slots == NO_ADAPTER], y0[slots == NO_ADAPTER])


@pytest.mark.parametrize("how", ["fused", "group pair", "one pass"])
@pytest.mark.parametrize("num_tokens", [13, 64])  # pair: mbgmv_shrink; mbgmv_shrink_staged
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_name", ["qkv", "gate_up", "o", "down"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_fused_group_matches_reference(L, gen, shape, group_name, dtype, num_tokens,
                                             how):
    """Decode shrink + expand for a module group (q, k, v into the fused output's columns;
    gate and up; o, whose d_in is num_heads * head_dim; down with d_in 11008..18944) in one launch (fused, one pass) or one launch
    each (lora_decode_group: members on grid.z): ranks differ per module and slot, rank-0
    modules and no-adapter tokens are left as they were."""
    check_fused(L, gen, shape, group_name, dtype, num_tokens, how=how)


@pytest.mark.parametrize("num_chunks", [1, 3, 1000])
def test_mbgmv_fused_any_number_of_chunks(L, gen, num_chunks):
    """Whatever the blocks per token (1: one block computes everything; 1000: clamped to a
    unit each), the result is the same; also for the fp32 pool, the 13B shapes (H = 5120,
    down's d_in 13824 over three page columns), Qwen2.5-7B's (H = 3584) and Qwen3-0.6B's (q
    twice as wide as H)."""
    check_fused(L, gen, LLAMA2_7B, "qkv", torch.bfloat16, 13, num_chunks)
    check_fused(L, gen, LLAMA2_13B, "down", torch.float16, 13, num_chunks)
    check_fused(L, gen, LLAMA3_8B, "o", torch.float32, 13, num_chunks)
    check_fused(L, gen, QWEN25_7B, "gate_up", torch.bfloat16, 13, num_chunks)
    check_fused(L, gen, QWEN3_06B, "qkv", torch.bfloat16, 13, num_chunks)
    check_fused(L, gen, QWEN3_06B, "o", torch.float16, 13, num_chunks)


def test_mbgmv_fp32_pool_matches_reference(L, gen):
    """float32 pools run the same decode kernels (4 elements per 16-byte vector)."""
    shape, dtype = LLAMA2_7B, torch.float32
    d_in, d_out = shape.module_dims("down_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(32, lp.ranks.shape[0], gen)
    x = torch.randn(32, d_in, device="cuda", generator=gen)
    out = torch.full((32, MAX_RANK), float("nan"), device="cuda")
    L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots, out=out)
    assert_close(out, torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots), dtype,
                 "fp32 shrink")
    y0 = torch.randn(32, d_out, device="cuda", generator=gen)
    y = L.lora_expand(y0.clone(), out, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    ref = torch_ref.lora_expand(y0.clone(), out, lp.pool, lp.page_table, lp.ranks, lp.scales,
                                slots)
    assert_close(y, ref, dtype, "fp32 expand")
