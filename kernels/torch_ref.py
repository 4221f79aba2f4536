"""Torch reference of every kernel: plain torch, any device, the oracle of the CUDA ones.

The unified pool of one layer is `pool` [num_pages, 2, H]: half 0 is the "K" half, half 1
the "V" half of every page. A token's K and V fill the first kv_dim elements of the halves
of its page. One rank-row i of an adapter module fills `n = ceil(max(d_in, d_out) / H)`
pages: row i of A ([r, d_in] as PEFT stores lora_A) laid across the K halves of those pages,
column i of B ([d_out, r] as PEFT stores lora_B) across their V halves.

Page tables:
* `lora_page_table` [num_slots, max_rank, max_pages_per_row] int32: the pages of one module
  of each resident adapter (slot); rows past the slot's rank for that module are ignored.
* `lora_ranks` [num_slots] int32: that module's rank per slot (0: not targeted).
* `lora_scales` [num_slots] float32: that module's scaling per slot.
* `token_slots` [num_tokens] int32: the slot of each token's adapter, NO_ADAPTER (-1) for none.
* A module group (lora_shrink_expand) takes every module's tables at once,
  [num_modules, ...], and `group` [num_members, 3] int32: (module index, first column of y,
  width) of each member.
* `kv_page_table` [num_reqs, max_pages] int32: page of each context position of a request.
  With a sliding window W, a request's positions before its first query's window
  (first_visible_position) are never read: their pages may be anything.

Every CUDA launcher in this package has the same signature and argument names.
"""
from __future__ import annotations

import numbers

import torch

NO_ADAPTER = -1


def _lora_rows(pool: torch.Tensor, pages: torch.Tensor, half: int, width: int) -> torch.Tensor:
    """The rows of one adapter module: pages [r, n] -> [r, width] (A rows or B^T rows)."""
    r, n = pages.shape
    return pool[pages.long(), half].reshape(r, n * pool.shape[-1])[:, :width]


def lora_shrink(x: torch.Tensor, pool: torch.Tensor, lora_page_table: torch.Tensor,
                lora_ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """v[t, i] = x[t] @ A_{s}[i] for i < rank[s], s = token_slots[t]; 0 elsewhere.

    x [num_tokens, d_in]; pool [num_pages, 2, H]; returns v [num_tokens, max_rank] float32.
    """
    num_tokens, d_in = x.shape
    max_rank = lora_page_table.shape[1]
    v = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    for slot in torch.unique(token_slots).tolist():
        if slot == NO_ADAPTER:
            continue
        rank = int(lora_ranks[slot])
        if rank == 0:
            continue
        idx = (token_slots == slot).nonzero().squeeze(1)
        a = _lora_rows(pool, lora_page_table[slot, :rank], 0, d_in).float()  # [r, d_in]
        v[idx, :rank] = x[idx].float() @ a.T
    return v


def lora_expand(y: torch.Tensor, v: torch.Tensor, pool: torch.Tensor,
                lora_page_table: torch.Tensor, lora_ranks: torch.Tensor,
                lora_scales: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """y[t] += scale[s] * v[t, :r] @ B_{s}^T[:r], s = token_slots[t], in place; returns y.

    y [num_tokens, d_out] (model dtype); v [num_tokens, max_rank] float32.
    """
    d_out = y.shape[1]
    for slot in torch.unique(token_slots).tolist():
        if slot == NO_ADAPTER:
            continue
        rank = int(lora_ranks[slot])
        if rank == 0:
            continue
        idx = (token_slots == slot).nonzero().squeeze(1)
        b = _lora_rows(pool, lora_page_table[slot, :rank], 1, d_out).float()  # [r, d_out]
        delta = float(lora_scales[slot]) * (v[idx, :rank] @ b)
        y[idx] = (y[idx].float() + delta).to(y.dtype)
    return y


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor,
                       lora_page_table: torch.Tensor, lora_ranks: torch.Tensor,
                       lora_scales: torch.Tensor, token_slots: torch.Tensor,
                       group: torch.Tensor) -> torch.Tensor:
    """For each member (m, col, d_out) of group: y[:, col:col + d_out] += module m's LoRA of
    x (lora_expand of lora_shrink), per token's adapter, in place; returns y.

    The members read the same x and write their own columns of y (q, k, v into the fused
    qkv output; gate and up). x [num_tokens, d_in]; y [num_tokens, width];
    lora_page_table [num_modules, num_slots, max_rank, n]; lora_ranks, lora_scales
    [num_modules, num_slots]; group [num_members, 3] int32.
    """
    for m, col, d_out in group.tolist():
        v = lora_shrink(x, pool, lora_page_table[m], lora_ranks[m], token_slots)
        lora_expand(y[:, col:col + d_out], v, pool, lora_page_table[m], lora_ranks[m],
                    lora_scales[m], token_slots)
    return y


def store_kv(k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor,
             token_page_ids: torch.Tensor) -> None:
    """pool[p_t, 0, :kv_dim] = k[t]; pool[p_t, 1, :kv_dim] = v[t].

    k, v [num_tokens, kv_dim]; token_page_ids [num_tokens] int32.
    """
    kv_dim = k.shape[1]
    pages = token_page_ids.long()
    pool[pages, 0, :kv_dim] = k.to(pool.dtype)
    pool[pages, 1, :kv_dim] = v.to(pool.dtype)


def write_adapter_rows(pages: torch.Tensor, rows: torch.Tensor, page_ids: torch.Tensor,
                       half: int) -> None:
    """One module's rows of a loaded adapter into their pages at every layer:
    pages[l, page_ids[i, c], half, :] = rows[l, i, c * H:(c + 1) * H], zero past the row's
    width.

    pages [num_layers, num_pages, 2, H] (the whole pool); rows [num_layers, r, width] (A, or
    B transposed; any strides); page_ids [r, n] int64, n * H >= width.
    """
    num_layers, r, width = rows.shape
    n, H = page_ids.shape[1], pages.shape[-1]
    padded = torch.zeros(num_layers, r, n * H, dtype=pages.dtype, device=pages.device)
    padded[:, :, :width] = rows
    pages[:, page_ids, half] = padded.view(num_layers, r, n, H)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """h += delta in place (when delta is given; the residual stream), then returns
    weight * RMSNorm(h) in h's dtype, computed as Hugging Face Llama does: the norm in
    float32, rounded to h's dtype, then times the weight.

    h, delta [num_tokens, hidden]; weight [hidden].
    """
    if delta is not None:
        h.add_(delta)
    xf = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), eps=eps)
    return weight * xf.to(h.dtype)


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm of each head vector, as Hugging Face Qwen3's q_norm / k_norm do (the
    norm in float32, rounded to x's dtype, then times the weight).

    x [num_tokens, num_heads, head_dim]; weight [head_dim]. Returns a new tensor.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin_signed: torch.Tensor, pool: torch.Tensor, token_page_ids: torch.Tensor,
                  num_heads: int, num_kv_heads: int, *, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6) -> torch.Tensor:
    """Rotary embedding of the q and k heads of the fused projection's output, the rotated
    k and the v of each token stored into its page (as store_kv); returns the rotated q.

    qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] (rows may be strided);
    positions [num_tokens] int; cos, sin_signed [max_positions, head_dim] float32 tables
    (the halves repeated; the sine's first half negated), rounded to qkv's dtype as Hugging
    Face Llama does: x * cos + rotate_half(x) * sin. q_norm, k_norm [head_dim] (Qwen3; both
    or neither): every q head, and every k head, goes through head_rms_norm with that weight
    before the rotation. Returns q [num_tokens, num_heads, head_dim], contiguous.
    """
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together: got only "
                         f"{'q_norm' if k_norm is None else 'k_norm'}")
    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    nq = num_heads + num_kv_heads
    c = cos[positions.long()].to(qkv.dtype).unsqueeze(1)
    s = sin_signed[positions.long()].to(qkv.dtype).unsqueeze(1)
    x = qkv[:, :nq * head_dim].view(num_tokens, nq, head_dim)
    if q_norm is not None:
        x = torch.cat([head_rms_norm(x[:, :num_heads], q_norm, norm_eps),
                       head_rms_norm(x[:, num_heads:], k_norm, norm_eps)], dim=1)
    qk = torch.addcmul(x * c, x.roll(head_dim // 2, dims=-1), s)
    store_kv(qk[:, num_heads:].reshape(num_tokens, num_kv_heads * head_dim),
             qkv[:, nq * head_dim:], pool, token_page_ids)
    return qk[:, :num_heads].contiguous()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up projection's output [num_tokens, 2 * inter]
    (gate first), rounded after each op as torch does in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=1)
    return torch.nn.functional.silu(gate) * up


def check_sliding_window(sliding_window) -> int:
    """The window as an int >= 0 (NO_WINDOW, 0: the whole context), or a ValueError that
    names the value."""
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral) \
            or sliding_window < 0:
        raise ValueError(f"sliding_window must be an int >= 0 (0: no window), got "
                         f"{sliding_window!r}")
    return int(sliding_window)


def first_visible_position(q_pos, sliding_window: int):
    """The first context position a query at q_pos sees: 0 without a window, else
    q_pos - W + 1 (at least 0), as Hugging Face Mistral's mask (key j visible from query p
    when p - W < j <= p). Works on ints and tensors alike."""
    if isinstance(q_pos, torch.Tensor):
        return (q_pos - sliding_window + 1).clamp_min(0) if sliding_window \
            else torch.zeros_like(q_pos)
    return max(0, q_pos - sliding_window + 1) if sliding_window else 0


def paged_attention(q: torch.Tensor, pool: torch.Tensor, kv_page_table: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    num_kv_heads: int, scale: float, *, sliding_window: int = 0) -> torch.Tensor:
    """Causal attention of each request's new tokens over its context, K/V read through the
    page table (the new tokens' K/V already stored).

    q [num_tokens, num_heads, head_dim], the tokens of request b at rows
    query_start_loc[b]:query_start_loc[b+1], which are the last positions of its context of
    context_lens[b] tokens. sliding_window W > 0: a query at position p sees the keys at
    p - W < j <= p only (first_visible_position); 0: all j <= p. Returns [num_tokens,
    num_heads, head_dim] in q's dtype.
    """
    window = check_sliding_window(sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    kv_dim = num_kv_heads * head_dim
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        lo = first_visible_position(ctx - (e - s), window)  # no query sees a key before it
        pages = kv_page_table[b, lo:ctx].long()
        k = pool[pages, 0, :kv_dim].float().view(ctx - lo, num_kv_heads, head_dim)
        v = pool[pages, 1, :kv_dim].float().view(ctx - lo, num_kv_heads, head_dim)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, ctx - lo, hd]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[s:e].float().transpose(0, 1)  # [heads, q_len, hd]
        scores = (qb @ k.transpose(1, 2)) * scale  # [heads, q_len, ctx - lo]
        q_pos = torch.arange(ctx - (e - s), ctx, device=q.device)
        k_pos = torch.arange(lo, ctx, device=q.device)
        mask = (k_pos[None, :] > q_pos[:, None]) \
            | (k_pos[None, :] < first_visible_position(q_pos, window)[:, None])
        scores.masked_fill_(mask, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def paged_attention_decode(q: torch.Tensor, pool: torch.Tensor, kv_page_table: torch.Tensor,
                           context_lens: torch.Tensor, num_kv_heads: int,
                           scale: float, *, sliding_window: int = 0) -> torch.Tensor:
    """One query token per request, at the last position of its context (so it sees the
    last min(W, context_len) positions with a window W > 0).

    q [num_reqs, num_heads, head_dim]; returns the same shape.
    """
    query_start_loc = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return paged_attention(q, pool, kv_page_table, context_lens, query_start_loc,
                           num_kv_heads, scale, sliding_window=sliding_window)
