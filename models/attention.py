"""Self-attention over the unified pool's pages: the fused q/k/v projection, the optional
per-head q/k norm, rotary embedding and the K/V store into the new tokens' pages (one fused
kernel), paged attention over each request's context (within the family's sliding window),
and the output projection."""
from __future__ import annotations

import torch

from slora.common.config import ModelConfig
from slora.kernels.backend import NO_WINDOW
from slora.models.linear import QKVParallelLinear, RowParallelLinear
from slora.models.norm import HeadNorm
from slora.models.parallel import TensorParallel


class PagedAttention(torch.nn.Module):
    """Attention of this rank's heads, K/V read from and written to the pool's pages."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int = NO_WINDOW):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        """Each query attends to the last sliding_window positions, itself included;
        NO_WINDOW (0): all."""

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor, rotary, layer: int, ctx,
                q_norm: HeadNorm | None = None, k_norm: HeadNorm | None = None) -> torch.Tensor:
        """qkv [num_tokens, (num_heads + 2 num_kv_heads) head_dim] -> [num_tokens,
        num_heads head_dim]; the new tokens' rotated K and their V stored in their pages.
        q_norm, k_norm (Qwen3): each q and k head normalised before the rotation."""
        be, pages, attn = ctx.backend, ctx.pool.layer(layer), ctx.attn
        norms = {} if q_norm is None else dict(q_norm=q_norm.weight, k_norm=k_norm.weight,
                                               norm_eps=q_norm.eps)
        q = be.rope_store_kv(qkv, positions, rotary.cos, rotary.sin_signed, pages, attn,
                             self.num_heads, self.num_kv_heads, **norms)  # [tokens, nh, hd]
        out = be.paged_attention(q, pages, attn, self.num_kv_heads, self.scale,
                                 sliding_window=self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


class SelfAttention(torch.nn.Module):
    """q/k/v (with bias where the family has it), q/k norms (Qwen3), rotary, paged attention
    and o, for layer `layer`."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int):
        super().__init__()
        self.layer = layer
        self.qkv_proj = QKVParallelLinear(cfg, tp, layer, bias=cfg.qkv_bias)
        nh, nkv, hd = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        self.attn = PagedAttention(nh, nkv, hd, cfg.sliding_window)
        self.o_proj = RowParallelLinear(cfg, tp, layer, "o_proj", cfg.hidden_size)
        self.q_norm = HeadNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = HeadNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary, ctx) -> torch.Tensor:
        qkv = self.qkv_proj(x, ctx)  # [num_tokens, (nh + 2 nkv) hd]
        out = self.attn(qkv, positions, rotary, self.layer, ctx, self.q_norm, self.k_norm)
        return self.o_proj(out, ctx)
