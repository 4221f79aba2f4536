"""Launchers of paged attention and the K/V store (cuda/attention.cu): the split-context
decode kernel (one query per request), the causal tensor-core prefill kernel, both with
Hugging Face Mistral's sliding window (sliding_window W > 0: a query at p sees p - W < j <= p).
"""
from __future__ import annotations

import math

import torch

from slora.kernels import torch_ref
from slora.kernels.cuda_compile import f32, get_kernel, i32, i64, launch, ptr
from slora.kernels.launchers import routing
from slora.kernels.launchers.checks import (check_attention, check_int, check_out, check_pool,
                                            check_rows)

ATTENTION = "attention.cu"


def store_kv(k, v, pool, token_page_ids):
    """pool[p_t, 0, :kv_dim] = k[t]; pool[p_t, 1, :kv_dim] = v[t].

    k, v [num_tokens, kv_dim] in the pool's dtype; token_page_ids [num_tokens] int32.
    """
    H = check_pool(pool)
    check_rows("k", k, pool)
    check_rows("v", v, pool, width=k.shape[1])
    num_tokens, kv_dim = k.shape
    if v.shape[0] != num_tokens:
        raise ValueError(f"v has {v.shape[0]} tokens; k has {num_tokens}")
    if kv_dim > H:
        raise ValueError(f"kv_dim={kv_dim} does not fit a page half of H={H}")
    check_int("token_page_ids", token_page_ids, pool, 1)
    if token_page_ids.shape[0] != num_tokens:
        raise ValueError(f"token_page_ids has {token_page_ids.shape[0]} tokens; k has {num_tokens}")
    if num_tokens == 0:
        return
    dev = pool.device.index
    launch(get_kernel(ATTENTION, pool.dtype, "store_kv", dev), (num_tokens,), (128,),
           (ptr(k), i64(k.stride(0)), ptr(v), i64(v.stride(0)), ptr(pool), i32(H),
            ptr(token_page_ids), i32(kv_dim)),
           dev)


def paged_attention_decode(q, pool, kv_page_table, context_lens, num_kv_heads, scale, *,
                           sliding_window=0, max_context_len=None, out=None):
    """One query token per request, at the last position of its context (so it sees the
    last min(W, context_len) positions with a window W > 0).

    q [num_reqs, num_heads, head_dim]; returns the same shape. `max_context_len` bounds the
    context lengths (default: kv_page_table's width); with the window it sets how the context
    is split over blocks, so keep both fixed across replays of a captured graph.
    """
    window = torch_ref.check_sliding_window(sliding_window)
    H, num_heads, head_dim = check_attention(q, pool, kv_page_table, context_lens, num_kv_heads)
    num_reqs = q.shape[0]
    if context_lens.shape[0] != num_reqs:
        raise ValueError(f"context_lens has {context_lens.shape[0]} requests; q has {num_reqs}")
    out = check_out(out, q)
    if num_reqs == 0:
        return out
    max_ctx = max(1, int(max_context_len or kv_page_table.shape[1]))
    if window:
        max_ctx = min(max_ctx, window)  # the most positions one query reads
    group = num_heads // num_kv_heads
    maxg = next(g for g in (1, 2, 4, 8) if g >= min(group, 8))
    subs = math.ceil(group / maxg)
    dev = pool.device.index
    base_blocks = num_reqs * num_kv_heads * subs
    num_splits = max(1, min(math.ceil(max_ctx / 256),
                            math.ceil(4 * routing.num_sms(dev) / base_blocks)))
    split_len = math.ceil(math.ceil(max_ctx / num_splits) / 64) * 64
    num_splits = math.ceil(max_ctx / split_len)
    if num_splits > 1:
        part_acc = torch.empty(num_reqs, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_reqs, num_heads, num_splits, 2,
                              dtype=torch.float32, device=q.device)
        parts = (ptr(part_acc), ptr(part_ml))
    else:
        parts = (ptr(out), ptr(out))  # unused
    kernel = get_kernel(ATTENTION, pool.dtype, f"paged_decode_hd{head_dim}_g{maxg}", dev)
    scale_log2 = float(scale) * math.log2(math.e)
    launch(kernel, (num_reqs, num_kv_heads * subs, num_splits), (128,),
           (ptr(q), ptr(pool), i32(H), ptr(kv_page_table), i32(kv_page_table.shape[1]),
            ptr(context_lens), i32(window), i32(num_heads), i32(num_kv_heads),
            f32(scale_log2), i32(split_len), i32(num_splits), ptr(out), *parts),
           dev)
    if num_splits > 1:
        launch(get_kernel(ATTENTION, pool.dtype, "paged_decode_reduce", dev),
               (num_reqs, num_heads), (head_dim,),
               (parts[0], parts[1], ptr(context_lens), i32(window), i32(num_heads),
                i32(head_dim), i32(split_len), i32(num_splits), ptr(out)),
               dev)
    return out


def paged_attention(q, pool, kv_page_table, context_lens, query_start_loc, num_kv_heads, scale,
                    *, sliding_window=0, out=None):
    """Causal attention of each request's new tokens over its context, K/V read through the
    page table (the new tokens' K/V already stored).

    q [num_tokens, num_heads, head_dim], the tokens of request b at rows
    query_start_loc[b]:query_start_loc[b+1] (absolute rows of q), which are the last positions
    of its context of context_lens[b] tokens. sliding_window W > 0: a query at position p
    sees the keys at p - W < j <= p only (the kernel skips the 64-position tiles before the
    window); 0: all j <= p. Returns [num_tokens, num_heads, head_dim] in q's dtype; rows of q
    outside every request are left unwritten in `out`.
    """
    window = torch_ref.check_sliding_window(sliding_window)
    H, num_heads, head_dim = check_attention(q, pool, kv_page_table, context_lens, num_kv_heads)
    check_int("query_start_loc", query_start_loc, pool, 1)
    num_reqs = context_lens.shape[0]
    if query_start_loc.shape[0] != num_reqs + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries; "
                         f"expected num_reqs + 1 = {num_reqs + 1}")
    out = check_out(out, q)
    if num_reqs == 0 or q.shape[0] == 0:
        return out
    if not routing.has_tensor_cores(pool.dtype):  # fp32: the reference
        ref = torch_ref.paged_attention(q, pool, kv_page_table, context_lens, query_start_loc,
                                        num_kv_heads, scale, sliding_window=window)
        out.copy_(ref)
        return out
    dev = pool.device.index
    kernel = get_kernel(ATTENTION, pool.dtype, f"paged_prefill_hd{head_dim}", dev)
    scale_log2 = float(scale) * math.log2(math.e)
    launch(kernel, (math.ceil(q.shape[0] / 64) + num_reqs, num_heads), (128,),
           (ptr(q), ptr(pool), i32(H), ptr(kv_page_table), i32(kv_page_table.shape[1]),
            ptr(context_lens), ptr(query_start_loc), i32(window), i32(num_reqs),
            i32(num_heads), i32(num_kv_heads), f32(scale_log2), ptr(out)),
           dev)
    return out
