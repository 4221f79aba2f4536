"""The routing policy of the launchers in one place: which kernel serves a call for which
size, dtype and GPU, and the knobs that steer it (module attributes, read at each launch:
tests and bench/kernels.py set them to compare the paths).

* Decode LoRA (MBGMV, lora_decode.py): decode_lora_path picks "one pass", "fused", "group
  pair" or "pair" by tokens, group size and GPU; shrink_staged whether the shrink stages x
  in shared memory; overlap whether a launch may start behind the kernel before it (PDL).
* Prefill LoRA (MBGMM, lora_prefill.py) and prefill attention (attention.py): tensor-core
  kernels for 16-bit pools (has_tensor_cores); fp32 pools take the per-token kernels or the
  torch reference. mbgmm_tile picks the 64- or 128-token tile.
"""
from __future__ import annotations

import torch

from slora.kernels.cuda_compile import pdl_available

_sm_counts: dict[int, int] = {}


_capabilities: dict[int, tuple[int, int]] = {}


def num_sms(device_index: int) -> int:
    """The GPU's streaming multiprocessors: the grids are sized to fill them."""
    if device_index not in _sm_counts:
        props = torch.cuda.get_device_properties(device_index)
        _sm_counts[device_index] = props.multi_processor_count
    return _sm_counts[device_index]


SHRINK_STAGED_MIN_TOKENS = 64
"""From this many tokens lora_shrink stages x in shared memory (mbgmv_shrink_staged)."""


def shrink_staged(num_tokens: int, page_bytes: int) -> bool:
    """Whether an MBGMV shrink takes mbgmv_shrink_staged (x's page-wide chunk staged in
    shared memory, which must fit its 48 KB): from SHRINK_STAGED_MIN_TOKENS tokens."""
    return num_tokens >= SHRINK_STAGED_MIN_TOKENS and page_bytes <= 48 << 10


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


def onepass_available(device_index: int) -> bool:
    """Whether mbgmv_onepass runs at full speed here: its 16-byte reductions into y need
    Hopper (sm_90); older GPUs would add into y one packed pair at a time."""
    if device_index not in _capabilities:
        _capabilities[device_index] = torch.cuda.get_device_capability(device_index)
    return _capabilities[device_index][0] >= 9


def overlap(overlap_previous: bool, dev: int) -> bool:
    """Whether a launch asked to overlap the kernel before it does (module knobs, GPU)."""
    return overlap_previous and OVERLAP and PDL and pdl_available(dev)


def has_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether the MBGMM and prefill attention kernels (mma.sync on 16-bit elements) serve a
    pool of this dtype; fp32 pools take the per-token kernels or the torch reference."""
    return dtype != torch.float32


SHRINK_TILE = None
"""Tokens per MBGMM shrink tile, 64 or 128; None: by the segments' average length."""


EXPAND_TILE = None
"""Tokens per MBGMM expand tile, 64 or 128; None: by the segments' average length."""


def mbgmm_tile(forced: int | None, num_tokens: int, num_segs: int) -> int:
    """Tokens per MBGMM tile: `forced` (the SHRINK_TILE / EXPAND_TILE knob) or, by default,
    128 where the segments average 128 tokens or more, else 64."""
    return forced or (128 if num_tokens >= 128 * num_segs else 64)
