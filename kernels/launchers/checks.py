"""What a kernel assumes, checked before its launch: device, dtype, shape, contiguity and
16-byte alignment, each failure a ValueError that names the argument and what it needed.
Values that live on the GPU (slots, pages, lengths) are not checked: reading them would
stall the host; a slot outside [0, num_slots) counts as NO_ADAPTER in the kernels.
"""
from __future__ import annotations

import math

import torch

POOL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


HEAD_DIMS = (64, 128)


def check_cuda(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; the pool is on {device}")


def check_pool(pool: torch.Tensor) -> int:
    if not isinstance(pool, torch.Tensor) or pool.device.type != "cuda":
        raise ValueError(f"pool must be a CUDA tensor, got {getattr(pool, 'device', type(pool))}")
    if pool.dtype not in POOL_DTYPES:
        raise ValueError(f"pool has dtype {pool.dtype}; the kernels take {POOL_DTYPES}")
    if pool.dim() != 3 or pool.shape[1] != 2:
        raise ValueError(f"pool must be [num_pages, 2, H], got {tuple(pool.shape)}")
    if not pool.is_contiguous():
        raise ValueError(f"pool must be contiguous, got strides {pool.stride()}")
    H = pool.shape[2]
    if H % vec_size(pool.dtype):
        raise ValueError(f"pool's H={H} must be a multiple of {vec_size(pool.dtype)} (16 bytes)")
    if pool.data_ptr() % 16:
        raise ValueError("pool's data must be 16-byte aligned")
    return H


VEC_SIZES = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}


def vec_size(dtype: torch.dtype) -> int:
    """Elements of `dtype` in one 16-byte vector (the kernels' unit of access)."""
    return VEC_SIZES[dtype]


def check_rows(name: str, t: torch.Tensor, pool: torch.Tensor, width: int | None = None) -> None:
    """A 2-D activation in the pool's dtype whose rows can be read 16 bytes at a time."""
    check_cuda(name, t, pool.device)
    if t.dtype != pool.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}; the pool has {pool.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    vec = vec_size(t.dtype)
    if t.shape[1] % vec:
        raise ValueError(f"{name} has {t.shape[1]} columns; it must be a multiple of {vec}")
    if t.shape[0] > 1 and t.shape[1] > 0 and (t.stride(1) != 1 or t.stride(0) % vec):
        raise ValueError(f"{name} needs contiguous rows with a row stride multiple of {vec}, "
                         f"got strides {t.stride()}")
    if t.data_ptr() % 16:
        raise ValueError(f"{name}'s data must be 16-byte aligned")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {width}")


def check_int(name: str, t: torch.Tensor, pool: torch.Tensor, ndim: int,
               dtype: torch.dtype = torch.int32) -> None:
    check_cuda(name, t, pool.device)
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def check_lora_tables(pool, lora_page_table, lora_ranks, width: int, width_name: str):
    H = check_pool(pool)
    check_int("lora_page_table", lora_page_table, pool, 3)
    num_slots, max_rank, pages_per_row = lora_page_table.shape
    check_int("lora_ranks", lora_ranks, pool, 1)
    if lora_ranks.shape[0] != num_slots:
        raise ValueError(f"lora_ranks has {lora_ranks.shape[0]} slots; "
                         f"lora_page_table has {num_slots}")
    if width > pages_per_row * H:
        raise ValueError(f"{width_name}={width} needs {math.ceil(width / H)} pages per row; "
                         f"lora_page_table has {pages_per_row} (H={H})")
    return H, num_slots, max_rank, pages_per_row


def check_v(v: torch.Tensor, pool: torch.Tensor, num_tokens: int, max_rank: int, name="v"):
    check_cuda(name, v, pool.device)
    if v.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {v.dtype}")
    if tuple(v.shape) != (num_tokens, max_rank) or not v.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [{num_tokens}, {max_rank}] tensor, "
                         f"got shape {tuple(v.shape)} strides {v.stride()}")


def check_segments(seg_starts, seg_slots, pool) -> int:
    check_int("seg_starts", seg_starts, pool, 1)
    check_int("seg_slots", seg_slots, pool, 1)
    if seg_starts.shape[0] != seg_slots.shape[0] + 1:
        raise ValueError(f"seg_starts has {seg_starts.shape[0]} entries; "
                         f"seg_slots has {seg_slots.shape[0]} (expected one fewer)")
    return seg_slots.shape[0]


def check_token_slots(token_slots, pool, num_tokens: int, against: str = "x") -> None:
    """token_slots: int32 [num_tokens], one per row of `against`."""
    check_int("token_slots", token_slots, pool, 1)
    if token_slots.shape[0] != num_tokens:
        raise ValueError(f"token_slots has {token_slots.shape[0]} tokens; "
                         f"{against} has {num_tokens}")


def check_same_tokens(y, x, pool) -> tuple[int, int]:
    """y and x as check_rows wants them, with as many rows; returns (num_tokens, d_in)."""
    check_rows("y", y, pool)
    check_rows("x", x, pool)
    num_tokens, d_in = x.shape
    if y.shape[0] != num_tokens:
        raise ValueError(f"y has {y.shape[0]} tokens; x has {num_tokens}")
    return num_tokens, d_in


def check_scales(lora_scales, pool, num_slots: int) -> None:
    check_cuda("lora_scales", lora_scales, pool.device)
    if lora_scales.dtype != torch.float32 or tuple(lora_scales.shape) != (num_slots,):
        raise ValueError(f"lora_scales must be float32 [{num_slots}], "
                         f"got {lora_scales.dtype} {tuple(lora_scales.shape)}")


def check_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales):
    """The checks of an expand's arguments; returns (num_tokens, d_out, H, num_slots,
    max_rank, pages_per_row)."""
    check_rows("y", y, pool)
    num_tokens, d_out = y.shape
    H, num_slots, max_rank, ppr = check_lora_tables(pool, lora_page_table, lora_ranks, d_out,
                                                     "d_out")
    check_v(v, pool, num_tokens, max_rank)
    check_scales(lora_scales, pool, num_slots)
    return num_tokens, d_out, H, num_slots, max_rank, ppr


def check_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, max_d_out):
    """The checks of a module group's arguments (every module's tables); returns
    (num_tokens, d_in, H, num_slots, max_rank, pages_per_row)."""
    num_tokens, d_in = check_same_tokens(y, x, pool)
    check_int("lora_page_table", lora_page_table, pool, 4)
    num_modules, num_slots, max_rank, ppr = lora_page_table.shape
    H = check_pool(pool)
    for name, t, dtype in (("lora_ranks", lora_ranks, torch.int32),
                           ("lora_scales", lora_scales, torch.float32)):
        check_int(name, t, pool, 2, dtype)
        if tuple(t.shape) != (num_modules, num_slots):
            raise ValueError(f"{name} must be [{num_modules}, {num_slots}], got {tuple(t.shape)}")
    width = max(d_in, max_d_out)
    if width > ppr * H:
        raise ValueError(f"rows of {width} need {math.ceil(width / H)} pages; "
                         f"lora_page_table has {ppr} per row (H={H})")
    if max_d_out > y.shape[1]:
        raise ValueError(f"max_d_out={max_d_out} is wider than y ({y.shape[1]} columns)")
    return num_tokens, d_in, H, num_slots, max_rank, ppr


def check_decode_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                        group, max_d_out):
    """check_group, and token_slots and group: the checks of a decode group launch."""
    shapes = check_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, max_d_out)
    check_token_slots(token_slots, pool, shapes[0])
    check_int("group", group, pool, 2)
    if group.shape[1] != 3 or not 1 <= group.shape[0] <= 65535:
        raise ValueError(f"group must be [num_members, 3], got {tuple(group.shape)}")
    return shapes


def check_attention(q, pool, kv_page_table, context_lens, num_kv_heads):
    H = check_pool(pool)
    check_cuda("q", q, pool.device)
    if q.dtype != pool.dtype:
        raise ValueError(f"q has dtype {q.dtype}; the pool has {pool.dtype}")
    if q.dim() != 3 or not q.is_contiguous():
        raise ValueError(f"q must be a contiguous [tokens, num_heads, head_dim] tensor, "
                         f"got shape {tuple(q.shape)} strides {q.stride()}")
    _, num_heads, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim}; the kernels are built for {HEAD_DIMS}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if num_kv_heads * head_dim > H:
        raise ValueError(f"kv_dim={num_kv_heads * head_dim} does not fit a page half of H={H}")
    check_int("kv_page_table", kv_page_table, pool, 2)
    check_int("context_lens", context_lens, pool, 1)
    if context_lens.shape[0] != kv_page_table.shape[0]:
        raise ValueError(f"context_lens has {context_lens.shape[0]} requests; "
                         f"kv_page_table has {kv_page_table.shape[0]}")
    return H, num_heads, head_dim


def check_out(out, like, name="out"):
    if out is None:
        return torch.empty_like(like)
    check_cuda(name, out, like.device)
    if out.dtype != like.dtype or out.shape != like.shape or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {like.dtype} {tuple(like.shape)} tensor, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def check_act(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """A CUDA activation [rows, cols] in a kernel dtype, contiguous, 16-byte aligned."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got {getattr(t, 'device', type(t))}")
    if t.dtype not in POOL_DTYPES or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{name} has dtype {t.dtype}; expected {dtype or POOL_DTYPES}")
    if t.dim() != 2 or not t.is_contiguous() or t.data_ptr() % 16:
        raise ValueError(f"{name} must be a contiguous, 16-byte aligned 2-D tensor, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")
