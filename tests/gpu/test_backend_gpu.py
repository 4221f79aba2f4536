"""The CUDA backend against the torch backend on a mixed batch as the worker calls them, a
decode step's kernels replayed from a CUDA graph, and the launchers' checks of what the
kernels assume. Marked `gpu`; skipped without CUDA or CuPy.
"""
from __future__ import annotations

import pytest
import torch

from helpers_gpu import (DTYPES, GPU_ONLY, LLAMA2_7B, LLAMA3_8B, MAX_RANK, QWEN3_06B,
                         assert_close, case_id, group_dims, make_group_pool, make_kv_pool,
                         make_lora_pool, make_segments, make_token_slots)
from slora.kernels import torch_ref
from slora.kernels.backend import NO_WINDOW, AttentionBatch, LoraBatch, LoraGroup, LoraTables
from slora.kernels.torch_backend import TorchBackend

pytestmark = GPU_ONLY

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [LLAMA3_8B, QWEN3_06B], ids=case_id)
def test_cuda_backend_matches_torch_backend_on_a_mixed_batch(L, gen, shape, dtype):
    """Decode tokens first, then prefill segments: LoRA and attention as the worker calls them
    (attention with and without a window shorter than most contexts)."""
    from slora.kernels.cuda_backend import CudaBackend
    d_in, d_out = shape.module_dims("q_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    num_decode = 12
    decode_slots = make_token_slots(num_decode, lp.ranks.shape[0], gen)
    seg_starts, seg_slots, token_slots = make_segments(num_decode, [40, 3, 90],
                                                       lp.ranks.shape[0], gen)
    token_slots[:num_decode] = decode_slots
    n = token_slots.shape[0]
    lora = LoraBatch(token_slots=token_slots, num_decode_tokens=num_decode,
                     seg_starts=seg_starts, seg_slots=seg_slots, any_lora=True)
    x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
    y0 = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
    cuda_be, torch_be = CudaBackend(), TorchBackend()
    tables = LoraTables(lp.page_table.unsqueeze(0), lp.ranks.unsqueeze(0),
                        lp.scales.unsqueeze(0))
    single = LoraGroup(((0, 0, d_out),), torch.tensor([[0, 0, d_out]], dtype=torch.int32,
                                                      device="cuda"))
    y = cuda_be.lora_group(y0.clone(), x, lp.pool, tables, single, lora)
    y_ref = torch_be.lora_group(y0.clone(), x, lp.pool, tables, single, lora)
    assert_close(y, y_ref, dtype, "backend LoRA of one module")

    # LoRA groups of the GQA shape: q, k, v and o alone (decode: the one-pass kernel on
    # Hopper, else the group's shrink and expand or, for o, MBGMV shrink and expand; prefill:
    # one MBGMM pair for the group or the module).
    dev = torch.cuda.current_device()
    hopper = L.onepass_available(dev)
    assert L.decode_lora_path(num_decode, 3, dev) == ("one pass" if hopper else "group pair")
    assert L.decode_lora_path(num_decode, 1, dev) == ("one pass" if hopper else "pair")
    for group_name in ("qkv", "o"):
        d_in, widths = group_dims(shape, group_name)
        gpool, gtable, granks, gscales, group, width = make_group_pool(shape.hidden, d_in,
                                                                       widths, dtype, gen)
        members = tuple(tuple(r) for r in group.tolist())
        xg = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
        yg0 = (torch.randn(n, width, device="cuda", generator=gen) * 0.01).to(dtype)
        gtables = LoraTables(gtable, granks, gscales)
        yg = cuda_be.lora_group(yg0.clone(), xg, gpool, gtables, LoraGroup(members, group), lora)
        yg_ref = torch_be.lora_group(yg0.clone(), xg, gpool, gtables, LoraGroup(members, group),
                                     lora)
        assert_close(yg, yg_ref, dtype, f"backend LoRA group {group_name}")

    # Attention: 12 decode requests, then 3 prefills (one with a cached prefix).
    lens = [int(c) for c in torch.randint(1, 900, (num_decode,), generator=gen,
                                          device="cuda").tolist()] + [40, 50, 90]
    q_lens = [1] * num_decode + [40, 3, 90]
    pool, table, context_lens = make_kv_pool(shape, lens, dtype, gen)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                       device="cuda")
    attn = AttentionBatch(kv_page_table=table, context_lens=context_lens, query_start_loc=qsl,
                          token_page_ids=torch.zeros(n, dtype=torch.int32, device="cuda"),
                          num_decode_reqs=num_decode, max_query_len=90,
                          max_context_len=max(lens))
    q = torch.randn(n, shape.num_heads, shape.head_dim, device="cuda", generator=gen).to(dtype)
    for window in (NO_WINDOW, 37):
        out = cuda_be.paged_attention(q, pool, attn, shape.num_kv_heads, 0.088,
                                      sliding_window=window)
        ref = torch_be.paged_attention(q, pool, attn, shape.num_kv_heads, 0.088,
                                       sliding_window=window)
        assert_close(out, ref, dtype, f"backend attention, window {window}")


@pytest.mark.parametrize("window", [NO_WINDOW, 200])
def test_decode_step_kernels_replay_in_a_cuda_graph(L, gen, window):
    """Shrink, expand and decode attention captured once, replayed on new inputs (context
    lengths from 1 to 500: with the window, shorter and longer than it)."""
    shape, dtype = LLAMA2_7B, torch.bfloat16
    d_in, d_out = shape.module_dims("q_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    num_reqs = 16
    slots = make_token_slots(num_reqs, lp.ranks.shape[0], gen)
    x = torch.randn(num_reqs, d_in, device="cuda", generator=gen).to(dtype)
    y0 = torch.randn(num_reqs, d_out, device="cuda", generator=gen).to(dtype)
    y = torch.empty_like(y0)
    kv_pool, table, lens = make_kv_pool(shape, [500] * num_reqs, dtype, gen)
    q = torch.randn(num_reqs, shape.num_heads, shape.head_dim, device="cuda",
                    generator=gen).to(dtype)

    def step():
        y.copy_(y0)
        v = L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots)
        L.lora_expand(y, v, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
        return L.paged_attention_decode(q, kv_pool, table, lens, shape.num_kv_heads, 0.088,
                                        sliding_window=window, max_context_len=table.shape[1])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # builds and loads the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn = step()

    x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
    y0.copy_(torch.randn(y0.shape, device="cuda", generator=gen))
    q.copy_(torch.randn(q.shape, device="cuda", generator=gen))
    slots.copy_(slots.flip(0))
    lens.copy_(torch.randint(1, 501, lens.shape, device="cuda", generator=gen, dtype=torch.int32))
    attn.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    v_ref = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots)
    y_ref = torch_ref.lora_expand(y0.clone(), v_ref, lp.pool, lp.page_table, lp.ranks,
                                  lp.scales, slots)
    assert_close(y, y_ref, dtype, "graph-replayed LoRA")
    ref = torch_ref.paged_attention_decode(q, kv_pool, table, lens, shape.num_kv_heads, 0.088,
                                           sliding_window=window)
    assert_close(attn, ref, dtype, "graph-replayed decode attention")


def test_launchers_name_the_argument_that_breaks_an_assumption(L, gen):
    """Wrong dtype, device or layout fails before launch, naming the argument."""
    lp = make_lora_pool(576, 576, 576, torch.bfloat16, gen)
    slots = make_token_slots(8, lp.ranks.shape[0], gen)
    x = torch.randn(8, 576, device="cuda", generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="x has dtype"):
        L.lora_shrink(x.half(), lp.pool, lp.page_table, lp.ranks, slots)
    with pytest.raises(ValueError, match="token_slots must be torch.int32"):
        L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots.long())
    with pytest.raises(ValueError, match="x is on cpu"):
        L.lora_shrink(x.cpu(), lp.pool, lp.page_table, lp.ranks, slots)
    with pytest.raises(ValueError, match="lora_ranks has"):
        L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks[:-1], slots)
    with pytest.raises(ValueError, match="y needs contiguous rows"):
        y = torch.randn(576, 8, device="cuda").to(torch.bfloat16).T
        L.lora_expand(y, torch.zeros(8, MAX_RANK, device="cuda"), lp.pool, lp.page_table,
                      lp.ranks, lp.scales, slots)
    with pytest.raises(ValueError, match="y has 4 tokens; x has 8"):
        L.lora_decode_onepass(torch.zeros(4, 576, device="cuda", dtype=torch.bfloat16), x,
                              lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    with pytest.raises(ValueError, match="lora_scales must be float32"):
        L.lora_decode_onepass(torch.zeros_like(x), x, lp.pool, lp.page_table, lp.ranks,
                              lp.scales.half(), slots)
    with pytest.raises(ValueError, match="parts must be a positive int, got 0"):
        L.lora_decode_onepass(torch.zeros_like(x), x, lp.pool, lp.page_table, lp.ranks,
                              lp.scales, slots, parts=0)
    q = torch.randn(2, 9, 64, device="cuda").to(torch.bfloat16)
    table = torch.zeros(2, 4, dtype=torch.int32, device="cuda")
    lens = torch.ones(2, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="num_kv_heads"):
        L.paged_attention_decode(q, lp.pool, table, lens, 4, 0.125)
