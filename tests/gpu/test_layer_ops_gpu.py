"""The per-layer kernels of kernels/cuda/layer_ops.cu (residual add + RMSNorm, rotary
embedding + K/V store, with and without Qwen3's per-head q/k RMSNorm, SiLU * up) against
their torch references, on the shapes of real models, in bf16, fp16 and fp32, on fresh
random inputs. Outputs land in memory that held NaN
just before (the caching allocator hands the freed block back), so an element a kernel
forgot to write fails. Marked `gpu`; skipped without CUDA or CuPy.
"""
from __future__ import annotations

import pytest
import torch

from helpers_gpu import (GPU_ONLY, LLAMA2_7B, LLAMA2_13B, LLAMA3_8B, QWEN3_06B, QWEN3_8B,
                         QWEN25_7B, SMOLLM2, case_id)
from slora.kernels import torch_ref

pytestmark = GPU_ONLY

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
SHAPES = [LLAMA2_7B, LLAMA2_13B, LLAMA3_8B, SMOLLM2, QWEN25_7B, QWEN3_8B, QWEN3_06B]
TOKENS = [1, 13, 300]


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)


def poison(numel: int, dtype: torch.dtype) -> None:
    """Fills a block of `numel` elements with NaN and frees it: the next allocation of that
    size gets it back."""
    t = torch.full((numel,), float("nan"), dtype=dtype, device="cuda")
    del t


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "an output element was never written"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "no-add"])
def test_add_rms_norm(L, gen, dtype, shape, num_tokens, with_delta):
    hidden = shape.hidden
    h = randn(num_tokens, hidden, dtype=dtype, gen=gen, scale=3.0)
    delta = randn(num_tokens, hidden, dtype=dtype, gen=gen) if with_delta else None
    weight = randn(hidden, dtype=dtype, gen=gen, scale=0.5)
    h_ref = h.clone()
    ref = torch_ref.add_rms_norm(h_ref, delta, weight, 1e-5)
    poison(h.numel(), dtype)
    out = L.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, h_ref), "the residual add differs from torch's"
    assert rel_err(out, ref) < TOL[dtype] / 10


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qk-norm-rope"])
def test_rope_store_kv(L, gen, dtype, shape, num_tokens, qk_norm):
    """q rotated into a new tensor; the rotated k and v written into each token's page (the
    pages shuffled), every other page and element untouched. qk_norm: each q and k head
    RMS-normed with its own weight first (Qwen3), in the same kernel."""
    nh, nkv, hd = shape.num_heads, shape.num_kv_heads, shape.head_dim
    H = shape.hidden
    num_pages, max_pos = 2 * num_tokens + 50, 4096
    width = (nh + 2 * nkv) * hd
    # The fused projection's output, as a strided slice of a wider buffer.
    qkv = randn(num_tokens, width + 8 * 4, dtype=dtype, gen=gen)[:, 8:8 + width]
    positions = torch.randint(0, max_pos, (num_tokens,), device="cuda", generator=gen,
                              dtype=torch.int32)
    pages = torch.randperm(num_pages, device="cuda", generator=gen)[:num_tokens].to(torch.int32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    cos = torch.cat([freqs, freqs], -1).cos().float().cuda()
    sin = torch.cat([-freqs.sin(), freqs.sin()], -1).float().cuda()
    pool = randn(num_pages, 2, H, dtype=dtype, gen=gen)
    pool_ref = pool.clone()
    norms = {}
    if qk_norm:  # scales around 1, as trained q_norm / k_norm weights are
        norms = dict(q_norm=randn(hd, dtype=dtype, gen=gen, scale=0.3) + 1,
                     k_norm=randn(hd, dtype=dtype, gen=gen, scale=0.3) + 1, norm_eps=1e-6)
    q_ref = torch_ref.rope_store_kv(qkv, positions, cos, sin, pool_ref, pages, nh, nkv, **norms)
    poison(num_tokens * nh * hd, dtype)
    q = L.rope_store_kv(qkv, positions, cos, sin, pool, pages, nh, nkv, **norms)
    assert q.shape == (num_tokens, nh, hd) and q.is_contiguous()
    assert rel_err(q, q_ref) < TOL[dtype] / 10
    assert rel_err(pool[pages.long()], pool_ref[pages.long()]) < TOL[dtype] / 10
    others = torch.ones(num_pages, dtype=torch.bool, device="cuda")
    others[pages.long()] = False
    assert torch.equal(pool[others], pool_ref[others]), "a page no token owns was written"
    kv_dim = nkv * hd
    assert torch.equal(pool[pages.long(), :, kv_dim:], pool_ref[pages.long(), :, kv_dim:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_silu_mul(L, gen, dtype, shape, num_tokens):
    inter = shape.intermediate
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, gen=gen, scale=2.0)
    ref = torch_ref.silu_mul(gate_up)
    poison(num_tokens * inter, dtype)
    out = L.silu_mul(gate_up)
    assert rel_err(out, ref) < TOL[dtype] / 10


def test_layer_ops_reject_bad_shapes(L, gen):
    h = randn(4, 64, dtype=torch.bfloat16, gen=gen)
    with pytest.raises(ValueError, match="delta"):
        L.add_rms_norm(h, randn(4, 32, dtype=torch.bfloat16, gen=gen),
                       randn(64, dtype=torch.bfloat16, gen=gen), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        L.add_rms_norm(h, None, randn(32, dtype=torch.bfloat16, gen=gen), 1e-5)
    pool = randn(8, 2, 64, dtype=torch.bfloat16, gen=gen)
    pos = torch.zeros(4, dtype=torch.int32, device="cuda")
    table = torch.zeros(16, 16, device="cuda")
    with pytest.raises(ValueError, match="heads"):
        L.rope_store_kv(randn(4, 40, dtype=torch.bfloat16, gen=gen), pos, table, table, pool,
                        pos, 1, 1)
    with pytest.raises(ValueError, match="positions"):
        L.rope_store_kv(randn(4, 48, dtype=torch.bfloat16, gen=gen), pos[:3], table, table,
                        pool, pos, 1, 1)
    qkv, cos = randn(4, 48, dtype=torch.bfloat16, gen=gen), torch.zeros(16, 16, device="cuda")
    weight = randn(16, dtype=torch.bfloat16, gen=gen)
    with pytest.raises(ValueError, match="q_norm and k_norm come together: got only q_norm"):
        L.rope_store_kv(qkv, pos, cos, cos, pool, pos, 1, 1, q_norm=weight)
    with pytest.raises(ValueError, match=r"k_norm must be .*\[16\] tensor, got .* \(8,\)"):
        L.rope_store_kv(qkv, pos, cos, cos, pool, pos, 1, 1, q_norm=weight, k_norm=weight[:8])


# (name, H, num_layers, d_in, d_out) of one module: a square projection, an MLP one whose
# B^T rows span 3 pages, and a head_dim-64 model's.
ADAPTER_MODULES = [("7b-q", 4096, 4, 4096, 4096), ("7b-down", 4096, 3, 11008, 4096),
                   ("7b-up", 4096, 2, 4096, 11008), ("smollm2-k", 576, 3, 576, 192)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", ADAPTER_MODULES, ids=lambda m: m[0])
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_write_adapter_rows(L, gen, dtype, module, rank):
    """An adapter module's A rows and B^T rows (read transposed from B as PEFT stores it)
    land in shuffled pages at every layer exactly as the torch reference puts them: the
    rows copied, the tails past the width zero, and every other page left as it was."""
    _, H, num_layers, d_in, d_out = module
    n = -(-max(d_in, d_out) // H)
    num_pages = rank * n * 2 + 5
    pages = torch.full((num_layers, num_pages, 2, H), float("nan"), dtype=dtype,
                       device="cuda")
    pages[:, :num_pages // 2] = randn(num_layers, num_pages // 2, 2, H, dtype=dtype, gen=gen)
    ids = torch.randperm(num_pages, generator=torch.Generator().manual_seed(rank))[:rank * n]
    page_ids = ids.view(rank, n).to("cuda")
    a = randn(num_layers, rank, d_in, dtype=dtype, gen=gen)
    b = randn(num_layers, d_out, rank, dtype=dtype, gen=gen)
    ref = pages.clone()
    torch_ref.write_adapter_rows(ref, a, page_ids, 0)
    torch_ref.write_adapter_rows(ref, b.transpose(1, 2), page_ids, 1)
    L.write_adapter_rows(pages, a, page_ids, 0)
    L.write_adapter_rows(pages, b.transpose(1, 2), page_ids, 1)
    assert torch.equal(pages.isnan(), ref.isnan()), "pages outside the adapter's changed"
    assert torch.equal(pages.nan_to_num(), ref.nan_to_num())
    rows = pages[:, page_ids.flatten()].view(num_layers, rank, n, 2, H)
    assert torch.equal(rows[..., 0, :].reshape(num_layers, rank, n * H)[..., :d_in], a)
    assert not rows[..., 0, :].reshape(num_layers, rank, n * H)[..., d_in:].any()
