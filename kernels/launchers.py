"""CUDA launchers of the kernels in kernels/cuda/, beside their torch references.

Each launcher has the signature and argument names of its reference in torch_ref.py (a few
launchers take extra keyword-only arguments at the end: `out=` to write into a given tensor,
and the bounds the grid needs that the reference reads off the data). Before a launch it checks
what the kernel assumes (device, dtype, shape, contiguity, 16-byte alignment) and names the
argument that fails. It does not check values that live on the GPU (slots, pages, lengths):
reading them would stall the host; a slot outside [0, num_slots) counts as NO_ADAPTER.

Kernels launch on torch's current stream and allocate only through torch, so every launcher
except the fp32 fallbacks can be captured in a CUDA graph.

Prefill LoRA comes as segment variants (MBGMM): `seg_starts` [num_segments + 1] int32 holds
row offsets into x / y / v (absolute, not relative to the first segment), `seg_slots`
[num_segments] int32 the slot of each. Equivalent to the token variants with
token_slots[seg_starts[i]:seg_starts[i + 1]] = seg_slots[i].
"""
from __future__ import annotations

import math

import numpy as np
import torch

from slora.kernels import torch_ref
from slora.kernels.cuda_compile import (allow_dynamic_smem, f32, get_kernel, i32, i64, launch,
                                       pdl_available, ptr)

MBGMV = "lora_mbgmv.cu"
MBGMM = "lora_mbgmm.cu"
ATTENTION = "attention.cu"
LAYER_OPS = "layer_ops.cu"
POOL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (64, 128)
_sm_counts: dict[int, int] = {}
NULL = np.uint64(0)
"""A null pointer argument."""


_capabilities: dict[int, tuple[int, int]] = {}


def _num_sms(device_index: int) -> int:
    if device_index not in _sm_counts:
        _sm_counts[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return _sm_counts[device_index]


# ---- checks -------------------------------------------------------------------------------

def _check_cuda(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; the pool is on {device}")


def _check_pool(pool: torch.Tensor) -> int:
    if not isinstance(pool, torch.Tensor) or pool.device.type != "cuda":
        raise ValueError(f"pool must be a CUDA tensor, got {getattr(pool, 'device', type(pool))}")
    if pool.dtype not in POOL_DTYPES:
        raise ValueError(f"pool has dtype {pool.dtype}; the kernels take {POOL_DTYPES}")
    if pool.dim() != 3 or pool.shape[1] != 2:
        raise ValueError(f"pool must be [num_pages, 2, H], got {tuple(pool.shape)}")
    if not pool.is_contiguous():
        raise ValueError(f"pool must be contiguous, got strides {pool.stride()}")
    H = pool.shape[2]
    if H % _vec(pool.dtype):
        raise ValueError(f"pool's H={H} must be a multiple of {_vec(pool.dtype)} (16 bytes)")
    if pool.data_ptr() % 16:
        raise ValueError("pool's data must be 16-byte aligned")
    return H


_VEC = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}


def _vec(dtype: torch.dtype) -> int:
    """Elements of `dtype` in one 16-byte vector (the kernels' unit of access)."""
    return _VEC[dtype]


def _check_rows(name: str, t: torch.Tensor, pool: torch.Tensor, width: int | None = None) -> None:
    """A 2-D activation in the pool's dtype whose rows can be read 16 bytes at a time."""
    _check_cuda(name, t, pool.device)
    if t.dtype != pool.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}; the pool has {pool.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    vec = _vec(t.dtype)
    if t.shape[1] % vec:
        raise ValueError(f"{name} has {t.shape[1]} columns; it must be a multiple of {vec}")
    if t.shape[0] > 1 and t.shape[1] > 0 and (t.stride(1) != 1 or t.stride(0) % vec):
        raise ValueError(f"{name} needs contiguous rows with a row stride multiple of {vec}, "
                         f"got strides {t.stride()}")
    if t.data_ptr() % 16:
        raise ValueError(f"{name}'s data must be 16-byte aligned")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {width}")


def _check_int(name: str, t: torch.Tensor, pool: torch.Tensor, ndim: int,
               dtype: torch.dtype = torch.int32) -> None:
    _check_cuda(name, t, pool.device)
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _check_lora_tables(pool, lora_page_table, lora_ranks, width: int, width_name: str):
    H = _check_pool(pool)
    _check_int("lora_page_table", lora_page_table, pool, 3)
    num_slots, max_rank, pages_per_row = lora_page_table.shape
    _check_int("lora_ranks", lora_ranks, pool, 1)
    if lora_ranks.shape[0] != num_slots:
        raise ValueError(f"lora_ranks has {lora_ranks.shape[0]} slots; "
                         f"lora_page_table has {num_slots}")
    if width > pages_per_row * H:
        raise ValueError(f"{width_name}={width} needs {math.ceil(width / H)} pages per row; "
                         f"lora_page_table has {pages_per_row} (H={H})")
    return H, num_slots, max_rank, pages_per_row


def _check_v(v: torch.Tensor, pool: torch.Tensor, num_tokens: int, max_rank: int, name="v"):
    _check_cuda(name, v, pool.device)
    if v.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {v.dtype}")
    if tuple(v.shape) != (num_tokens, max_rank) or not v.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [{num_tokens}, {max_rank}] tensor, "
                         f"got shape {tuple(v.shape)} strides {v.stride()}")


def _check_segments(seg_starts, seg_slots, pool) -> int:
    _check_int("seg_starts", seg_starts, pool, 1)
    _check_int("seg_slots", seg_slots, pool, 1)
    if seg_starts.shape[0] != seg_slots.shape[0] + 1:
        raise ValueError(f"seg_starts has {seg_starts.shape[0]} entries; "
                         f"seg_slots has {seg_slots.shape[0]} (expected one fewer)")
    return seg_slots.shape[0]


def _check_token_slots(token_slots, pool, num_tokens: int, against: str = "x") -> None:
    """token_slots: int32 [num_tokens], one per row of `against`."""
    _check_int("token_slots", token_slots, pool, 1)
    if token_slots.shape[0] != num_tokens:
        raise ValueError(f"token_slots has {token_slots.shape[0]} tokens; "
                         f"{against} has {num_tokens}")


def _check_same_tokens(y, x, pool) -> tuple[int, int]:
    """y and x as _check_rows wants them, with as many rows; returns (num_tokens, d_in)."""
    _check_rows("y", y, pool)
    _check_rows("x", x, pool)
    num_tokens, d_in = x.shape
    if y.shape[0] != num_tokens:
        raise ValueError(f"y has {y.shape[0]} tokens; x has {num_tokens}")
    return num_tokens, d_in


def _check_scales(lora_scales, pool, num_slots: int) -> None:
    _check_cuda("lora_scales", lora_scales, pool.device)
    if lora_scales.dtype != torch.float32 or tuple(lora_scales.shape) != (num_slots,):
        raise ValueError(f"lora_scales must be float32 [{num_slots}], "
                         f"got {lora_scales.dtype} {tuple(lora_scales.shape)}")


def _check_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales):
    """The checks of an expand's arguments; returns (num_tokens, d_out, H, num_slots,
    max_rank, pages_per_row)."""
    _check_rows("y", y, pool)
    num_tokens, d_out = y.shape
    H, num_slots, max_rank, ppr = _check_lora_tables(pool, lora_page_table, lora_ranks, d_out,
                                                     "d_out")
    _check_v(v, pool, num_tokens, max_rank)
    _check_scales(lora_scales, pool, num_slots)
    return num_tokens, d_out, H, num_slots, max_rank, ppr


# ---- LoRA decode (MBGMV) ------------------------------------------------------------------

def lora_shrink(x, pool, lora_page_table, lora_ranks, token_slots, *, out=None,
                _overlap_previous=False):
    """v[t, i] = x[t] @ A_{s}[i] for i < rank[s], s = token_slots[t]; 0 elsewhere.

    x [num_tokens, d_in]; pool [num_pages, 2, H]; returns v [num_tokens, max_rank] float32
    (written into `out` when given: every element is written).
    """
    _check_rows("x", x, pool)
    num_tokens, d_in = x.shape
    H, num_slots, max_rank, ppr = _check_lora_tables(pool, lora_page_table, lora_ranks, d_in, "d_in")
    _check_token_slots(token_slots, pool, num_tokens)
    if out is None:
        out = torch.empty(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    _check_v(out, pool, num_tokens, max_rank, "out")
    if num_tokens == 0 or max_rank == 0:
        return out
    _launch_mbgmv_shrink(x, pool, lora_page_table, lora_ranks, token_slots, out,
                         _overlap(_overlap_previous, pool.device.index))
    return out


def _overlap(overlap_previous: bool, dev: int) -> bool:
    """Whether a launch asked to overlap the kernel before it does (module knobs, GPU)."""
    return overlap_previous and OVERLAP and PDL and pdl_available(dev)


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
    staged = num_tokens >= SHRINK_STAGED_MIN_TOKENS and H * pool.element_size() <= 48 << 10
    kernel = get_kernel(MBGMV, pool.dtype, "mbgmv_shrink_staged" if staged else "mbgmv_shrink",
                        dev)
    # Blocks loop over row pairs: enough of them to fill the GPU (~4 resident per SM), not
    # so many that most find only rows past the rank.
    row_groups = max(1, min(math.ceil(max_rank / 2),
                            math.ceil(4 * _num_sms(dev) / (num_tokens * num_members))))
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
    chunks_per_page = math.ceil(H / (128 * _vec(pool.dtype)))
    launch(get_kernel(MBGMV, pool.dtype, "mbgmv_expand", dev),
           (num_tokens, math.ceil(d_out / H) * chunks_per_page, num_members), (128,),
           (ptr(y), i64(y.stride(0)), ptr(v), ptr(pool), i32(H), ptr(lora_page_table),
            i32(num_slots), i32(max_rank), i32(ppr), ptr(lora_ranks), ptr(lora_scales),
            ptr(token_slots), i32(d_out), i32(chunks_per_page),
            *_group_args(group, num_slots * max_rank * ppr), i32(v.shape[1])),
           dev, shared_mem=8 * max_rank, pdl=behind_shrink and PDL)


def lora_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots, *,
                _behind_shrink=False):
    """y[t] += scale[s] * v[t, :r] @ B_{s}^T[:r], s = token_slots[t], in place; returns y.

    y [num_tokens, d_out] (model dtype); v [num_tokens, max_rank] float32.
    """
    num_tokens, d_out, H, num_slots, max_rank, ppr = _check_expand(
        y, v, pool, lora_page_table, lora_ranks, lora_scales)
    _check_token_slots(token_slots, pool, num_tokens, "y")
    if num_tokens == 0 or max_rank == 0 or d_out == 0:
        return y
    _launch_mbgmv_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                         d_out, _behind_shrink)
    return y


SHRINK_STAGED_MIN_TOKENS = 64
"""From this many tokens lora_shrink stages x in shared memory (mbgmv_shrink_staged)."""
PDL = True
"""lora_decode launches its expand with programmatic dependent launch (where the GPU has it)."""
OVERLAP = True
"""lora_decode and lora_shrink_expand honour overlap_previous (False: launch as without it)."""
FUSED_GROUP_MIN_TOKENS = 64
"""From this many decode tokens a group of several modules takes the fused kernel; below it
lora_decode_group (H200, q, k, v at rank 16, one adapter per token, lora_decode_group
against the fused kernel: 4.7 / 10.9 us at 1 token, 7.8 / 13.1 at 16, 12.1 / 16.2 at 32,
20.9 / 20.9 at 64, 60.9 / 57.0 at 256)."""
FUSED_DECODE_MIN_TOKENS = 256
"""From this many decode tokens the fused kernel (lora_shrink_expand) beats lora_decode for a
single module too (H100, rank 16, one adapter per token: 28.3 against 30.9 us at 256 tokens;
at 64 the pair wins, 11.3 against 14.7)."""


ONEPASS = True
"""decode_lora_path takes the one-pass kernel where it runs at full speed (False: the routing
of other GPUs, for comparison)."""
ONEPASS_MAX_TOKENS = 128
"""Below this many decode tokens a module group (or a single module) takes the one-pass kernel
where it runs at full speed (onepass_available: Hopper); from here the routing of other GPUs.
Alone the one-pass kernel wins up to 256 tokens and more (H200, q,k,v at rank 16, one adapter
per token: 50.9 us at 256 tokens against the fused kernel's 56.2), but in the worker's decode
step (bench/decode_step.py, dummy Llama-2-7B, rank 16 on q, k, v, o) the graph replay at 128
requests took 14.83 / 14.86 ms with it against 14.68 / 14.65 without, and 9.78 / 9.76 against
9.84 / 9.83 at 64."""


def decode_lora_path(num_tokens: int, num_members: int, device_index: int) -> str:
    """Which decode LoRA launches a module group of `num_members` takes for `num_tokens`
    decode tokens on the GPU `device_index` (CudaBackend.lora_group; bench/kernels.py reports
    the same path). On Hopper (onepass_available) below ONEPASS_MAX_TOKENS: "one pass"
    (lora_decode_onepass, or lora_decode_onepass_group for several modules). Otherwise,
    several modules: "fused" (lora_shrink_expand) from FUSED_GROUP_MIN_TOKENS tokens, "group
    pair" (lora_decode_group) below; one module: "fused" from FUSED_DECODE_MIN_TOKENS, "pair"
    (lora_decode) below."""
    if ONEPASS and num_tokens < ONEPASS_MAX_TOKENS and onepass_available(device_index):
        return "one pass"
    if num_members > 1:
        return "fused" if num_tokens >= FUSED_GROUP_MIN_TOKENS else "group pair"
    return "fused" if num_tokens >= FUSED_DECODE_MIN_TOKENS else "pair"


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


def onepass_available(device_index: int) -> bool:
    """Whether mbgmv_onepass runs at full speed here: its 16-byte reductions into y need
    Hopper (sm_90); older GPUs would add into y one packed pair at a time."""
    if device_index not in _capabilities:
        _capabilities[device_index] = torch.cuda.get_device_capability(device_index)
    return _capabilities[device_index][0] >= 9


def onepass_parts(num_tokens: int, max_rank: int, device_index: int,
                  num_members: int = 1) -> int:
    """lora_decode_onepass's default blocks per token and module: two resident blocks per SM
    over the batch's tokens and modules, at most one per group of ONEPASS_ROWS rows and at
    most ONEPASS_MAX_PARTS."""
    fill = max(1, 2 * _num_sms(device_index) // max(1, num_tokens * num_members))
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
           dev, shared_mem=smem, pdl=_overlap(overlap_previous, dev))
    return y


def lora_decode_onepass(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, *,
                        parts=None, overlap_previous=False):
    """lora_decode's result in one launch where no block waits for another (mbgmv_onepass):
    `parts` blocks per token (default onepass_parts) each take every parts-th group of 4
    rows below the token's rank, compute their dot products with x and add the scaled sum of
    their B^T rows into y by vector reductions. y is rounded once per part; the parts land in
    any order (not bit-reproducible). overlap_previous: as lora_decode's (the first pool loads
    are issued before the wait, x and y are touched after it). Returns y."""
    num_tokens, d_in = _check_same_tokens(y, x, pool)
    d_out = y.shape[1]
    H, num_slots, max_rank, ppr = _check_lora_tables(pool, lora_page_table, lora_ranks,
                                                     max(d_in, d_out), "max(d_in, d_out)")
    _check_scales(lora_scales, pool, num_slots)
    _check_token_slots(token_slots, pool, num_tokens)
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
    num_tokens, d_in, H, num_slots, max_rank, ppr = _check_decode_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, group, max_d_out)
    if num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    return _launch_onepass(y, x, pool, H, lora_page_table, num_slots, max_rank, ppr,
                           lora_ranks, lora_scales, token_slots, max_d_out, parts,
                           overlap_previous, group)


FUSED_THREADS = 128


def _check_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, max_d_out):
    """The checks of a module group's arguments (every module's tables); returns
    (num_tokens, d_in, H, num_slots, max_rank, pages_per_row)."""
    num_tokens, d_in = _check_same_tokens(y, x, pool)
    _check_int("lora_page_table", lora_page_table, pool, 4)
    num_modules, num_slots, max_rank, ppr = lora_page_table.shape
    H = _check_pool(pool)
    for name, t, dtype in (("lora_ranks", lora_ranks, torch.int32),
                           ("lora_scales", lora_scales, torch.float32)):
        _check_int(name, t, pool, 2, dtype)
        if tuple(t.shape) != (num_modules, num_slots):
            raise ValueError(f"{name} must be [{num_modules}, {num_slots}], got {tuple(t.shape)}")
    width = max(d_in, max_d_out)
    if width > ppr * H:
        raise ValueError(f"rows of {width} need {math.ceil(width / H)} pages; "
                         f"lora_page_table has {ppr} per row (H={H})")
    if max_d_out > y.shape[1]:
        raise ValueError(f"max_d_out={max_d_out} is wider than y ({y.shape[1]} columns)")
    return num_tokens, d_in, H, num_slots, max_rank, ppr


def _check_decode_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                        group, max_d_out):
    """_check_group, and token_slots and group: the checks of a decode group launch."""
    shapes = _check_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, max_d_out)
    _check_token_slots(token_slots, pool, shapes[0])
    _check_int("group", group, pool, 2)
    if group.shape[1] != 3 or not 1 <= group.shape[0] <= 65535:
        raise ValueError(f"group must be [num_members, 3], got {tuple(group.shape)}")
    return shapes


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
    num_tokens, d_in, H, num_slots, max_rank, ppr = _check_decode_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, group, max_d_out)
    if num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    dev = pool.device.index
    unit = FUSED_THREADS * _vec(pool.dtype)
    max_units = math.ceil(max_d_out / H) * math.ceil(H / unit)
    if num_chunks is None:
        num_chunks = math.ceil(2 * _num_sms(dev) / (num_tokens * group.shape[0]))
    num_chunks = max(1, min(num_chunks, max_units))
    launch(get_kernel(MBGMV, pool.dtype, "mbgmv_fused", dev),
           (num_tokens, num_chunks, group.shape[0]), (FUSED_THREADS,),
           (ptr(y), i64(y.stride(0)), ptr(x), i64(x.stride(0)), ptr(pool), i32(H),
            ptr(lora_page_table), i32(num_slots), i32(max_rank), i32(ppr), ptr(lora_ranks),
            ptr(lora_scales), ptr(token_slots), ptr(group), i32(d_in)),
           dev, shared_mem=3 * max_rank * 4, pdl=_overlap(overlap_previous, dev))
    return y


def lora_decode_group(y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                      group, *, max_d_out, overlap_previous=False):
    """lora_shrink_expand's result by lora_decode's two kernels, each one launch for the
    whole group (grid.z: the members): the shrink writes every member's v, the expand,
    launched behind it with programmatic dependent launch, adds each member's product into
    its columns of y. Below FUSED_GROUP_MIN_TOKENS tokens this beats the fused kernel, which
    has each block recompute the token's shrink. Arguments as lora_shrink_expand's;
    overlap_previous as lora_decode's. Returns y."""
    num_tokens, d_in, H, num_slots, max_rank, ppr = _check_decode_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, token_slots, group, max_d_out)
    if num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    v = torch.empty(num_tokens, group.shape[0] * max_rank, dtype=torch.float32,
                    device=x.device)
    _launch_mbgmv_shrink(x, pool, lora_page_table, lora_ranks, token_slots, v,
                         _overlap(overlap_previous, pool.device.index), group)
    _launch_mbgmv_expand(y, v, pool, lora_page_table, lora_ranks, lora_scales, token_slots,
                         max_d_out, True, group)
    return y


# ---- LoRA prefill (MBGMM) -----------------------------------------------------------------

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
SHRINK_TILE = None
"""Tokens per MBGMM shrink tile, 64 or 128; None: by the segments' average length."""
EXPAND_WAVES = 1.0
"""MBGMM expand blocks per resident slot the stripes aim at (shorter stripes above 1)."""
EXPAND_TILE = None
"""Tokens per MBGMM expand tile, 64 or 128; None: by the segments' average length."""


def _expand_launch(dev, pool, num_tokens, num_segs, d_out, num_members):
    """(kernel, grid, block, shared_mem) of an MBGMM expand over all members: mbgmm_expand
    (128-token tiles, 2 blocks of 96 KB per SM) where the segments average 128 tokens or more,
    else mbgmm_expand_64 (4 blocks of 56 KB). grid.x cuts the 64-column steps of d_out into
    equal stripes (the kernel derives the stripe width from grid.x) so that the blocks (tiles
    x stripes x members) make about one wave; grid.y: the tiles of the tokens plus one per
    segment up to MAX_EXTRA_TILE_ROWS (see _tile_rows)."""
    bm = _mbgmm_tile(EXPAND_TILE, num_tokens, num_segs)
    # The kernel fits as many stages as the shared memory given here (%dynamic_smem_size).
    name, smem, per_sm = (("mbgmm_expand", 96 << 10, 2) if bm == 128
                          else ("mbgmm_expand_64", 56 << 10, 4))
    kernel = get_kernel(MBGMM, pool.dtype, name, dev)
    allow_dynamic_smem(kernel, smem, dev)
    tiles = _tile_rows(num_tokens, num_segs, bm)
    col_steps = math.ceil(d_out / 64)
    want = round(EXPAND_WAVES * per_sm * _num_sms(dev)
                 / (math.ceil(num_tokens / bm) * num_members))
    per_block = math.ceil(col_steps / max(1, min(col_steps, want)))
    return kernel, (math.ceil(col_steps / per_block), tiles, num_members), (2 * bm,), smem


def _mbgmm_tile(forced: int | None, num_tokens: int, num_segs: int) -> int:
    """Tokens per MBGMM tile: `forced` (the SHRINK_TILE / EXPAND_TILE knob) or, by default,
    128 where the segments average 128 tokens or more, else 64."""
    return forced or (128 if num_tokens >= 128 * num_segs else 64)


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
    bm = _mbgmm_tile(SHRINK_TILE, num_tokens, num_segs)
    name, smem, per_sm = (("mbgmm_shrink_128", 96 << 10, 2) if bm == 128
                          else ("mbgmm_shrink", 48 << 10, 4))
    kernel = get_kernel(MBGMM, pool.dtype, name, dev)
    allow_dynamic_smem(kernel, smem, dev)
    rank_tiles = math.ceil(max_rank / SHRINK_RANK_TILE) * num_members
    want = per_sm * _num_sms(dev) / (math.ceil(num_tokens / bm) * rank_tiles)
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
    _check_rows("x", x, pool)
    num_tokens, d_in = x.shape
    H, num_slots, max_rank, ppr = _check_lora_tables(pool, lora_page_table, lora_ranks, d_in, "d_in")
    num_segs = _check_segments(seg_starts, seg_slots, pool)
    if out is None:
        out = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    _check_v(out, pool, num_tokens, max_rank, "out")
    if num_segs == 0 or num_tokens == 0 or max_rank == 0:
        return out
    if pool.dtype == torch.float32:  # no fp32 tensor-core path: per-token kernel
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
    num_tokens, d_out, H, num_slots, max_rank, ppr = _check_expand(
        y, v, pool, lora_page_table, lora_ranks, lora_scales)
    num_segs = _check_segments(seg_starts, seg_slots, pool)
    if num_segs == 0 or num_tokens == 0 or max_rank == 0 or d_out == 0:
        return y
    if pool.dtype == torch.float32:
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
    (where PDL and the GPU allow): its blocks take the SMs the shrink's last blocks leave,
    read their tables and first y and B^T tiles, and wait only to read v.
    """
    num_tokens, d_in, H, num_slots, max_rank, ppr = _check_group(
        y, x, pool, lora_page_table, lora_ranks, lora_scales, max_d_out)
    num_segs = _check_segments(seg_starts, seg_slots, pool)
    _check_int("group", group, pool, 2)
    num_members = group.shape[0]
    if group.shape[1] != 3 or not 1 <= num_members <= 65535:
        raise ValueError(f"group must be [num_members, 3], got {tuple(group.shape)}")
    if num_segs == 0 or num_tokens == 0 or max_rank == 0 or max_d_out == 0:
        return y
    if pool.dtype == torch.float32:  # no fp32 tensor-core path: the reference
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
           dev, shared_mem=smem, pdl=PDL)
    return y


# ---- attention ----------------------------------------------------------------------------

def store_kv(k, v, pool, token_page_ids):
    """pool[p_t, 0, :kv_dim] = k[t]; pool[p_t, 1, :kv_dim] = v[t].

    k, v [num_tokens, kv_dim] in the pool's dtype; token_page_ids [num_tokens] int32.
    """
    H = _check_pool(pool)
    _check_rows("k", k, pool)
    _check_rows("v", v, pool, width=k.shape[1])
    num_tokens, kv_dim = k.shape
    if v.shape[0] != num_tokens:
        raise ValueError(f"v has {v.shape[0]} tokens; k has {num_tokens}")
    if kv_dim > H:
        raise ValueError(f"kv_dim={kv_dim} does not fit a page half of H={H}")
    _check_int("token_page_ids", token_page_ids, pool, 1)
    if token_page_ids.shape[0] != num_tokens:
        raise ValueError(f"token_page_ids has {token_page_ids.shape[0]} tokens; k has {num_tokens}")
    if num_tokens == 0:
        return
    dev = pool.device.index
    launch(get_kernel(ATTENTION, pool.dtype, "store_kv", dev), (num_tokens,), (128,),
           (ptr(k), i64(k.stride(0)), ptr(v), i64(v.stride(0)), ptr(pool), i32(H),
            ptr(token_page_ids), i32(kv_dim)),
           dev)


def _check_attention(q, pool, kv_page_table, context_lens, num_kv_heads):
    H = _check_pool(pool)
    _check_cuda("q", q, pool.device)
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
    _check_int("kv_page_table", kv_page_table, pool, 2)
    _check_int("context_lens", context_lens, pool, 1)
    if context_lens.shape[0] != kv_page_table.shape[0]:
        raise ValueError(f"context_lens has {context_lens.shape[0]} requests; "
                         f"kv_page_table has {kv_page_table.shape[0]}")
    return H, num_heads, head_dim


def _check_out(out, like, name="out"):
    if out is None:
        return torch.empty_like(like)
    _check_cuda(name, out, like.device)
    if out.dtype != like.dtype or out.shape != like.shape or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {like.dtype} {tuple(like.shape)} tensor, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def paged_attention_decode(q, pool, kv_page_table, context_lens, num_kv_heads, scale, *,
                           sliding_window=0, max_context_len=None, out=None):
    """One query token per request, at the last position of its context (so it sees the
    last min(W, context_len) positions with a window W > 0).

    q [num_reqs, num_heads, head_dim]; returns the same shape. `max_context_len` bounds the
    context lengths (default: kv_page_table's width); with the window it sets how the context
    is split over blocks, so keep both fixed across replays of a captured graph.
    """
    window = torch_ref.check_sliding_window(sliding_window)
    H, num_heads, head_dim = _check_attention(q, pool, kv_page_table, context_lens, num_kv_heads)
    num_reqs = q.shape[0]
    if context_lens.shape[0] != num_reqs:
        raise ValueError(f"context_lens has {context_lens.shape[0]} requests; q has {num_reqs}")
    out = _check_out(out, q)
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
                            math.ceil(4 * _num_sms(dev) / base_blocks)))
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
    H, num_heads, head_dim = _check_attention(q, pool, kv_page_table, context_lens, num_kv_heads)
    _check_int("query_start_loc", query_start_loc, pool, 1)
    num_reqs = context_lens.shape[0]
    if query_start_loc.shape[0] != num_reqs + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries; "
                         f"expected num_reqs + 1 = {num_reqs + 1}")
    out = _check_out(out, q)
    if num_reqs == 0 or q.shape[0] == 0:
        return out
    if pool.dtype == torch.float32:  # no fp32 tensor-core path: the reference
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


# ---- the small steps between a layer's GEMMs ------------------------------------------------

NORM_THREADS, NORM_MAXV = 256, 8  # as in layer_ops.cu


def _check_act(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """A CUDA activation [rows, cols] in a kernel dtype, contiguous, 16-byte aligned."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got {getattr(t, 'device', type(t))}")
    if t.dtype not in POOL_DTYPES or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{name} has dtype {t.dtype}; expected {dtype or POOL_DTYPES}")
    if t.dim() != 2 or not t.is_contiguous() or t.data_ptr() % 16:
        raise ValueError(f"{name} must be a contiguous, 16-byte aligned 2-D tensor, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def add_rms_norm(h, delta, weight, eps):
    """h += delta in place (delta None: no add), then weight * RMSNorm(h) (torch_ref)."""
    _check_act("h", h)
    hidden = h.shape[1]
    if delta is not None:
        _check_act("delta", delta, h.dtype)
        if delta.shape != h.shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)}; h has {tuple(h.shape)}")
    _check_cuda("weight", weight, h.device)
    if weight.dtype != h.dtype or tuple(weight.shape) != (hidden,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous {h.dtype} [{hidden}] tensor, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    vec = _vec(h.dtype)
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
    q_norm and k_norm, each q and k head is RMS-normed first (torch ops, then the kernel)."""
    H = _check_pool(pool)
    _check_rows("qkv", qkv, pool)
    num_tokens = qkv.shape[0]
    nq = num_heads + num_kv_heads
    head_dim, rest = divmod(qkv.shape[1], nq + num_kv_heads)
    if rest or head_dim % 2:
        raise ValueError(f"qkv has {qkv.shape[1]} columns: not (num_heads + 2 * num_kv_heads "
                         f"= {nq + num_kv_heads}) heads of an even head_dim")
    if num_kv_heads * head_dim > H:
        raise ValueError(f"kv_dim={num_kv_heads * head_dim} does not fit a page half of H={H}")
    _check_int("positions", positions, pool, 1)
    _check_int("token_page_ids", token_page_ids, pool, 1)
    for name, t in (("positions", positions), ("token_page_ids", token_page_ids)):
        if t.shape[0] != num_tokens:
            raise ValueError(f"{name} has {t.shape[0]} entries; qkv has {num_tokens} tokens")
    for name, t in (("cos", cos), ("sin_signed", sin_signed)):
        _check_cuda(name, t, pool.device)
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != head_dim \
                or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [max_positions, {head_dim}] "
                             f"tensor, got {t.dtype} {tuple(t.shape)}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together: got only "
                         f"{'q_norm' if k_norm is None else 'k_norm'}")
    if (head_dim // 2) % _vec(pool.dtype):
        return torch_ref.rope_store_kv(qkv, positions, cos, sin_signed, pool, token_page_ids,
                                       num_heads, num_kv_heads, q_norm=q_norm, k_norm=k_norm,
                                       norm_eps=norm_eps)
    if q_norm is not None:
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            _check_cuda(name, w, pool.device)
            if w.dtype != qkv.dtype or tuple(w.shape) != (head_dim,):
                raise ValueError(f"{name} must be a {qkv.dtype} [{head_dim}] tensor, got "
                                 f"{w.dtype} {tuple(w.shape)}")
        nq = num_heads + num_kv_heads
        heads = qkv[:, :nq * head_dim].unflatten(1, (nq, head_dim))
        normed = torch.cat([torch_ref.head_rms_norm(heads[:, :num_heads], q_norm, norm_eps),
                            torch_ref.head_rms_norm(heads[:, num_heads:], k_norm, norm_eps)],
                           dim=1)
        qkv = torch.cat([normed.flatten(1), qkv[:, nq * head_dim:]], dim=1)
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    dev = pool.device.index
    launch(get_kernel(LAYER_OPS, pool.dtype, "rope_store_kv", dev), (num_tokens,), (128,),
           (ptr(qkv), i64(qkv.stride(0)), ptr(positions), ptr(cos), ptr(sin_signed), ptr(q),
            ptr(pool), i32(H), ptr(token_page_ids), i32(num_heads), i32(num_kv_heads),
            i32(head_dim)),
           dev)
    return q


def silu_mul(gate_up):
    """silu(gate) * up of [num_tokens, 2 * inter] (gate first) (torch_ref)."""
    _check_act("gate_up", gate_up)
    num_tokens, width = gate_up.shape
    inter = width // 2
    if width % 2 or inter % _vec(gate_up.dtype):
        return torch_ref.silu_mul(gate_up)
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    items = num_tokens * inter // _vec(gate_up.dtype)
    if items == 0:
        return out
    dev = gate_up.device.index
    launch(get_kernel(LAYER_OPS, gate_up.dtype, "silu_mul", dev), (math.ceil(items / 256),),
           (256,), (ptr(gate_up), ptr(out), i64(num_tokens), i32(inter)), dev)
    return out


# ---- the pool -----------------------------------------------------------------------------

def write_adapter_rows(pages, rows, page_ids, half):
    """One module's rows of a loaded adapter into their pages at every layer, one launch
    (torch_ref.write_adapter_rows).

    pages [num_layers, num_pages, 2, H] (the whole pool, contiguous); rows [num_layers, r,
    width] in the pool's dtype, any strides (A, or B transposed); page_ids [r, n] int64.
    """
    if not isinstance(pages, torch.Tensor) or pages.dim() != 4 or pages.shape[2] != 2:
        raise ValueError(f"pages must be [num_layers, num_pages, 2, H], got "
                         f"{tuple(getattr(pages, 'shape', ()))}")
    _check_pool(pages[0])
    _check_cuda("rows", rows, pages.device)
    if rows.dtype != pages.dtype:
        raise ValueError(f"rows has dtype {rows.dtype}; the pool has {pages.dtype}")
    num_layers, _, _, H = pages.shape
    if rows.dim() != 3 or rows.shape[0] != num_layers:
        raise ValueError(f"rows must be [{num_layers}, r, width], got {tuple(rows.shape)}")
    _check_int("page_ids", page_ids, pages, 2, dtype=torch.int64)
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
