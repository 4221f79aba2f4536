"""CUDA launchers of the kernels in kernels/cuda/, beside their torch references, one module
per kernel family as the sources are: lora_decode (MBGMV), lora_prefill (MBGMM), attention,
layer_ops; checks (what the kernels assume) and routing (which kernel for which size, dtype
and GPU, and its knobs) serve them all.

Each launcher has the signature and argument names of its reference in torch_ref.py (a few
launchers take extra keyword-only arguments at the end: `out=` to write into a given tensor,
and the bounds the grid needs that the reference reads off the data). Before a launch it checks
what the kernel assumes and names the argument that fails (checks.py).

Kernels launch on torch's current stream and allocate only through torch, so every launcher
except the fp32 fallbacks can be captured in a CUDA graph. Importing this package needs CuPy.
"""
from slora.kernels.launchers.attention import paged_attention, paged_attention_decode, store_kv
from slora.kernels.launchers.layer_ops import (add_rms_norm, rope_store_kv, silu_mul,
                                               write_adapter_rows)
from slora.kernels.launchers.lora_decode import (lora_decode, lora_decode_group,
                                                 lora_decode_onepass, lora_decode_onepass_group,
                                                 lora_expand, lora_shrink, lora_shrink_expand,
                                                 onepass_parts)
from slora.kernels.launchers.lora_prefill import (lora_expand_segments, lora_shrink_expand_segments,
                                                  lora_shrink_segments)
from slora.kernels.launchers.routing import decode_lora_path, onepass_available

__all__ = [
    "add_rms_norm", "decode_lora_path", "lora_decode", "lora_decode_group", "lora_decode_onepass",
    "lora_decode_onepass_group", "lora_expand", "lora_expand_segments", "lora_shrink",
    "lora_shrink_expand", "lora_shrink_expand_segments", "lora_shrink_segments",
    "onepass_available", "onepass_parts", "paged_attention", "paged_attention_decode",
    "rope_store_kv", "silu_mul", "store_kv", "write_adapter_rows",
]
