"""Launchers of the small steps between a layer's GEMMs and of the adapter-row writes
(cuda/layer_ops.cu): residual add + RMSNorm, rotary embedding + K/V store (with Qwen3's
per-head q/k norm), SiLU(gate) * up. Shapes the kernels do not cover (a width that is not a
whole number of 16-byte vectors, a row too wide for one block) take the torch reference.
"""
from __future__ import annotations

import math

import torch

from slora.kernels import torch_ref
from slora.kernels.cuda_compile import NULL, f32, get_kernel, i32, i64, launch, ptr
from slora.kernels.launchers.checks import (check_act, check_cuda, check_int, check_pool,
                                            check_rows, vec_size)

LAYER_OPS = "layer_ops.cu"


NORM_THREADS, NORM_MAXV = 256, 8  # as in layer_ops.cu


def add_rms_norm(h, delta, weight, eps):
    """h += delta in place (delta None: no add), then weight * RMSNorm(h) (torch_ref)."""
    check_act("h", h)
    hidden = h.shape[1]
    if delta is not None:
        check_act("delta", delta, h.dtype)
        if delta.shape != h.shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)}; h has {tuple(h.shape)}")
    check_cuda("weight", weight, h.device)
    if weight.dtype != h.dtype or tuple(weight.shape) != (hidden,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous {h.dtype} [{hidden}] tensor, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    vec = vec_size(h.dtype)
    if hidden % vec or hidden > NORM_THREADS * NORM_MAXV * vec or weight.data_ptr() % 16:
        return torch_ref.add_rms_norm(h, delta, weight, eps)
    out = torch.empty_like(h)
    if h.shape[0] == 0:
        return out
    dev = h.device.index
    launch(get_kernel(LAYER_OPS, h.dtype, "add_rms_norm", dev), (h.shape[0],), (NORM_THREADS,),
           (ptr(h), ptr(delta if delta is not None else h), i32(delta is not None),
            ptr(weight), ptr(out), i32(hidden), f32(eps)),
           dev)
    return out


def rope_store_kv(qkv, positions, cos, sin_signed, pool, token_page_ids, num_heads,
                  num_kv_heads, *, q_norm=None, k_norm=None, norm_eps=1e-6):
    """Rotary q and k, k and v stored into each token's page; returns q (torch_ref). With
    q_norm and k_norm (Qwen3), each q and k head is RMS-normed first, in the same kernel."""
    H = check_pool(pool)
    check_rows("qkv", qkv, pool)
    num_tokens = qkv.shape[0]
    nq = num_heads + num_kv_heads
    head_dim, rest = divmod(qkv.shape[1], nq + num_kv_heads)
    if rest or head_dim % 2:
        raise ValueError(f"qkv has {qkv.shape[1]} columns: not (num_heads + 2 * num_kv_heads "
                         f"= {nq + num_kv_heads}) heads of an even head_dim")
    if num_kv_heads * head_dim > H:
        raise ValueError(f"kv_dim={num_kv_heads * head_dim} does not fit a page half of H={H}")
    check_int("positions", positions, pool, 1)
    check_int("token_page_ids", token_page_ids, pool, 1)
    for name, t in (("positions", positions), ("token_page_ids", token_page_ids)):
        if t.shape[0] != num_tokens:
            raise ValueError(f"{name} has {t.shape[0]} entries; qkv has {num_tokens} tokens")
    for name, t in (("cos", cos), ("sin_signed", sin_signed)):
        check_cuda(name, t, pool.device)
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != head_dim \
                or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [max_positions, {head_dim}] "
                             f"tensor, got {t.dtype} {tuple(t.shape)}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together: got only "
                         f"{'q_norm' if k_norm is None else 'k_norm'}")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is None:
            continue
        check_cuda(name, w, pool.device)
        if w.dtype != qkv.dtype or tuple(w.shape) != (head_dim,) or w.stride(0) != 1 \
                or w.data_ptr() % 16:
            raise ValueError(f"{name} must be a contiguous, 16-byte aligned {qkv.dtype} "
                             f"[{head_dim}] tensor, got {w.dtype} {tuple(w.shape)}")
    half_vectors, rest = divmod(head_dim // 2, vec_size(pool.dtype))
    # The norm sums a head's squares over its half_vectors lanes by shuffles (layer_ops.cu).
    lanes_ok = half_vectors <= 32 and half_vectors & (half_vectors - 1) == 0
    if rest or (q_norm is not None and not lanes_ok):
        return torch_ref.rope_store_kv(qkv, positions, cos, sin_signed, pool, token_page_ids,
                                       num_heads, num_kv_heads, q_norm=q_norm, k_norm=k_norm,
                                       norm_eps=norm_eps)
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    dev = pool.device.index
    launch(get_kernel(LAYER_OPS, pool.dtype, "rope_store_kv", dev), (num_tokens,), (128,),
           (ptr(qkv), i64(qkv.stride(0)), ptr(positions), ptr(cos), ptr(sin_signed), ptr(q),
            ptr(pool), i32(H), ptr(token_page_ids), i32(num_heads), i32(num_kv_heads),
            i32(head_dim), NULL if q_norm is None else ptr(q_norm),
            NULL if k_norm is None else ptr(k_norm), f32(norm_eps)),
           dev)
    return q


def silu_mul(gate_up):
    """silu(gate) * up of [num_tokens, 2 * inter] (gate first) (torch_ref)."""
    check_act("gate_up", gate_up)
    num_tokens, width = gate_up.shape
    inter = width // 2
    if width % 2 or inter % vec_size(gate_up.dtype):
        return torch_ref.silu_mul(gate_up)
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    items = num_tokens * inter // vec_size(gate_up.dtype)
    if items == 0:
        return out
    dev = gate_up.device.index
    launch(get_kernel(LAYER_OPS, gate_up.dtype, "silu_mul", dev), (math.ceil(items / 256),),
           (256,), (ptr(gate_up), ptr(out), i64(num_tokens), i32(inter)), dev)
    return out


def write_adapter_rows(pages, rows, page_ids, half):
    """One module's rows of a loaded adapter into their pages at every layer, one launch
    (torch_ref.write_adapter_rows).

    pages [num_layers, num_pages, 2, H] (the whole pool, contiguous); rows [num_layers, r,
    width] in the pool's dtype, any strides (A, or B transposed); page_ids [r, n] int64.
    """
    if not isinstance(pages, torch.Tensor) or pages.dim() != 4 or pages.shape[2] != 2:
        raise ValueError(f"pages must be [num_layers, num_pages, 2, H], got "
                         f"{tuple(getattr(pages, 'shape', ()))}")
    check_pool(pages[0])
    check_cuda("rows", rows, pages.device)
    if rows.dtype != pages.dtype:
        raise ValueError(f"rows has dtype {rows.dtype}; the pool has {pages.dtype}")
    num_layers, _, _, H = pages.shape
    if rows.dim() != 3 or rows.shape[0] != num_layers:
        raise ValueError(f"rows must be [{num_layers}, r, width], got {tuple(rows.shape)}")
    check_int("page_ids", page_ids, pages, 2, dtype=torch.int64)
    r, width = rows.shape[1], rows.shape[2]
    n = page_ids.shape[1]
    if page_ids.shape[0] != r or n * H < width:
        raise ValueError(f"page_ids {tuple(page_ids.shape)} do not hold {r} rows of {width}")
    if half not in (0, 1):
        raise ValueError(f"half must be 0 or 1, got {half}")
    if r == 0 or n == 0:
        return
    dev = pages.device.index
    launch(get_kernel(LAYER_OPS, pages.dtype, "write_adapter_rows", dev), (r * n, num_layers),
           (256,), (ptr(pages), i64(pages.stride(0)), i32(H), ptr(rows), i64(rows.stride(0)),
                    i64(rows.stride(1)), i64(rows.stride(2)), i32(width), ptr(page_ids),
                    i32(n), i32(half)),
           dev)
