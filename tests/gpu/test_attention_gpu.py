"""Paged attention and the K/V store (kernels/launchers/attention.py) against their torch
references, on the attention shapes of real models (MHA, GQA with 3, 4, 7 and 8 query heads
per KV head, head_dim 64 and 128, q wider than the page), with and without a sliding window:
Mistral-7B's 4096, a window of 100 shorter than most contexts, and windows shorter than one
64-position tile. Contexts sit on randomly permuted pages; with a window, the page ids of the
positions no query may see point at a page of NaN, so a kernel that read one (even to mask
it) fails. Marked `gpu`; skipped without CUDA or CuPy.
"""
from __future__ import annotations

import pytest
import torch

from helpers_gpu import (ATTN_SHAPES, DTYPES, GPU_ONLY, LLAMA2_13B, LLAMA3_8B, QWEN25_7B,
                         SMOLLM2, assert_close, case_id, make_kv_pool)
from slora.kernels import torch_ref
from slora.kernels.backend import NO_WINDOW

pytestmark = GPU_ONLY

SHORT_WINDOW = 100
WINDOW_CASES = [(shape, window) for shape in ATTN_SHAPES
                for window in sorted({NO_WINDOW, SHORT_WINDOW, shape.sliding_window})]
"""(shape, sliding_window): every shape without a window and with a short one, Mistral also
with its own."""


def poison_before_windows(pool, table, first_query_positions, window):
    """The pool with one more page, of NaN, and the table's entries for the positions that no
    query of a request sees (before its first query's window) pointing at it."""
    if window == NO_WINDOW:
        return pool
    nan_page = pool.shape[0]
    pool = torch.cat([pool, torch.full_like(pool[:1], float("nan"))])
    for b, pos in enumerate(first_query_positions):
        table[b, :max(0, pos - window + 1)] = nan_page
    return pool


def check_decode(L, gen, shape, dtype, contexts, window, scale, what):
    pool, table, lens = make_kv_pool(shape, contexts, dtype, gen)
    pool = poison_before_windows(pool, table, [c - 1 for c in contexts], window)
    q = torch.randn(len(contexts), shape.num_heads, shape.head_dim, device="cuda",
                    generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    L.paged_attention_decode(q, pool, table, lens, shape.num_kv_heads, scale,
                             sliding_window=window, out=out)
    ref = torch_ref.paged_attention_decode(q, pool, table, lens, shape.num_kv_heads, scale,
                                           sliding_window=window)
    assert_close(out, ref, dtype, f"{what}, window {window}")


def check_prefill(L, gen, shape, dtype, reqs, window, what):
    """reqs: (context_len, q_len) of each request, its new tokens the last q_len positions."""
    pool, table, lens = make_kv_pool(shape, [c for c, _ in reqs], dtype, gen)
    pool = poison_before_windows(pool, table, [c - n for c, n in reqs], window)
    qsl = [0]
    for _, n in reqs:
        qsl.append(qsl[-1] + n)
    qsl = torch.tensor(qsl, dtype=torch.int32, device="cuda")
    q = torch.randn(int(qsl[-1]), shape.num_heads, shape.head_dim, device="cuda",
                    generator=gen).to(dtype)
    scale = shape.head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    L.paged_attention(q, pool, table, lens, qsl, shape.num_kv_heads, scale,
                      sliding_window=window, out=out)
    ref = torch_ref.paged_attention(q, pool, table, lens, qsl, shape.num_kv_heads, scale,
                                    sliding_window=window)
    assert_close(out, ref, dtype, f"{what}, window {window}")


DECODE_CONTEXTS = [1, 7, 64, 65, 300, 1024, 2000, 33, 4097, 5000]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,window", WINDOW_CASES, ids=case_id)
def test_decode_attention_matches_reference(L, gen, shape, window, dtype):
    """One query per request over contexts of 1..5000 positions scattered over the pool:
    shorter and longer than the window, split over blocks where long."""
    check_decode(L, gen, shape, dtype, DECODE_CONTEXTS, window, shape.head_dim ** -0.5,
                 f"{shape.name} decode attention")


@pytest.mark.parametrize("window", [NO_WINDOW, 1000])
def test_decode_attention_fp32_and_small_batch_split(L, gen, window):
    """fp32 pool; a batch of 2 long contexts, which the launcher splits over many blocks (with
    the window: splits of the last 1000 positions only, merged over the window's span)."""
    check_decode(L, gen, LLAMA3_8B, torch.float32, [3000, 5], window, 0.1,
                 "fp32 decode attention")


PREFILL_REQS = [(1, 1), (70, 70), (300, 45), (129, 129), (1000, 200), (64, 64), (5000, 300)]
"""(context_len, q_len): whole prompts and chunks after a prefix; with a window of 100 the
chunks (300, 45), (1000, 200) and the 129-token prompt cross the window's edge, and with
4096 the chunk at 4700..4999."""


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,window", WINDOW_CASES, ids=case_id)
def test_prefill_attention_matches_reference(L, gen, shape, window, dtype):
    """Causal attention of new tokens at the end of their contexts (some with a prefix)."""
    check_prefill(L, gen, shape, dtype, PREFILL_REQS, window,
                  f"{shape.name} prefill attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [1, 37, 64, 65])
@pytest.mark.parametrize("shape", [SMOLLM2, QWEN25_7B], ids=case_id)
def test_windows_shorter_than_a_tile(L, gen, shape, window, dtype):
    """Windows of 1 (each query sees only itself), 37, 64 and 65 positions: the prefill's
    64-key tiles hold keys some of a tile's queries see and others do not, the decode's
    context is mostly before the window."""
    check_prefill(L, gen, shape, dtype, [(1, 1), (200, 200), (700, 130), (90, 3)], window,
                  f"{shape.name} prefill attention")
    check_decode(L, gen, shape, dtype, [1, 2, 63, 64, 65, 66, 700], window,
                 shape.head_dim ** -0.5, f"{shape.name} decode attention")


def test_a_bad_window_is_refused_by_name(L, gen):
    """A negative or non-int window is a ValueError naming the value, before any launch."""
    shape = SMOLLM2
    pool, table, lens = make_kv_pool(shape, [5], torch.bfloat16, gen)
    q = torch.randn(1, shape.num_heads, shape.head_dim, device="cuda").to(torch.bfloat16)
    for bad in (-1, 4096.0):
        with pytest.raises(ValueError, match=f"sliding_window must be an int >= 0.*{bad!r}"):
            L.paged_attention_decode(q, pool, table, lens, shape.num_kv_heads, 0.1,
                                     sliding_window=bad)
        with pytest.raises(ValueError, match=f"sliding_window must be an int >= 0.*{bad!r}"):
            L.paged_attention(q, pool, table, lens, torch.tensor([0, 1], dtype=torch.int32,
                                                                 device="cuda"),
                              shape.num_kv_heads, 0.1, sliding_window=bad)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", [LLAMA2_13B, LLAMA3_8B], ids=case_id)
def test_store_kv_writes_exactly_the_tokens_pages(L, gen, shape, dtype):
    """store_kv writes K and V into the first kv_dim elements of each token's page, nothing else."""
    num_pages, n = 300, 97
    pool = torch.randn(num_pages, 2, shape.hidden, device="cuda", generator=gen).to(dtype)
    pages = torch.randperm(num_pages, device="cuda", generator=gen)[:n].to(torch.int32)
    k = torch.randn(n, shape.kv_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(n, shape.kv_dim, device="cuda", generator=gen).to(dtype)
    expected = pool.clone()
    torch_ref.store_kv(k, v, expected, pages)
    L.store_kv(k, v, pool, pages)
    assert torch.equal(pool, expected)
