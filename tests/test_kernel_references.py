"""The torch references of the per-layer kernels (kernels/torch_ref.py), which the CUDA
kernels are tested against on the GPU, compute what Hugging Face's own modules compute."""
from __future__ import annotations

import pytest
import torch

from slora.kernels import torch_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_head_rms_norm_is_qwen3s_q_and_k_norm(dtype):
    """head_rms_norm of [tokens, heads, head_dim] equals transformers' Qwen3RMSNorm (q_norm,
    k_norm) bit for bit, weight and eps included."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 4, 128, generator=gen) * 3).to(dtype)
    norm = Qwen3RMSNorm(128, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(128, generator=gen) * 0.3 + 1)
        theirs = norm(x)
    ours = torch_ref.head_rms_norm(x, norm.weight.detach(), 1e-6)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_rope_store_kv_norms_q_and_k_heads_before_rotating():
    """With q_norm and k_norm, rope_store_kv rotates the normed heads (Qwen3's order) and
    stores the normed, rotated k; v is stored as it came."""
    gen = torch.Generator().manual_seed(1)
    num_tokens, nh, nkv, hd = 5, 4, 2, 16
    qkv = torch.randn(num_tokens, (nh + 2 * nkv) * hd, generator=gen)
    positions = torch.tensor([0, 3, 9, 2, 7])
    freqs = torch.outer(torch.arange(16, dtype=torch.float64),
                        1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cos = torch.cat([freqs, freqs], -1).cos().float()
    sin = torch.cat([-freqs.sin(), freqs.sin()], -1).float()
    q_w, k_w = torch.rand(hd, generator=gen) + 0.5, torch.rand(hd, generator=gen) + 0.5
    pool, pool_plain = torch.zeros(8, 2, nkv * hd), torch.zeros(8, 2, nkv * hd)
    pages = torch.tensor([6, 1, 4, 0, 3], dtype=torch.int32)
    q = torch_ref.rope_store_kv(qkv, positions, cos, sin, pool, pages, nh, nkv,
                                q_norm=q_w, k_norm=k_w, norm_eps=1e-6)
    heads = qkv[:, :(nh + nkv) * hd].view(num_tokens, nh + nkv, hd)
    normed = torch.cat([torch_ref.head_rms_norm(heads[:, :nh], q_w, 1e-6),
                        torch_ref.head_rms_norm(heads[:, nh:], k_w, 1e-6)], dim=1)
    qkv_normed = torch.cat([normed.flatten(1), qkv[:, (nh + nkv) * hd:]], dim=1)
    q_plain = torch_ref.rope_store_kv(qkv_normed, positions, cos, sin, pool_plain, pages, nh,
                                      nkv)
    assert torch.equal(q, q_plain) and torch.equal(pool, pool_plain)
    assert torch.equal(pool[pages.long(), 1], qkv[:, (nh + nkv) * hd:])
    with pytest.raises(ValueError, match="q_norm and k_norm come together: got only k_norm"):
        torch_ref.rope_store_kv(qkv, positions, cos, sin, pool, pages, nh, nkv, k_norm=k_w)
