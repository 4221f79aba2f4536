"""The Llama architecture over the unified pool, with batched multi-adapter LoRA.

Base and LoRA compute stay separate (never merged): for each projection
`y = x W^T + scale_i * (x A_i^T) B_i^T`, where `x W^T` is one dense GEMM for the whole
batch and the LoRA part is the backend's shrink / expand over the adapters' pages, with
every token free to use its own adapter and rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slora.common.config import LORA_MODULE_INDEX, ModelConfig
from slora.kernels.backend import AttentionBatch, LoraBatch
from slora.worker.pool import UnifiedPool
from slora.worker.weights import LlamaWeights


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] float64 inverse frequencies, with Llama-3 style scaling if any."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type") == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


@dataclass
class ForwardBatch:
    """Everything one forward pass needs, as device tensors (built by the worker)."""

    input_ids: torch.Tensor
    """[num_tokens] int64"""
    positions: torch.Tensor
    """[num_tokens] int64"""
    attn: AttentionBatch
    lora: LoraBatch
    logits_indices: torch.Tensor
    """[num_sampled] int64: the tokens whose next-token logits are needed."""


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: LlamaWeights, backend):
        self.cfg = cfg
        self.w = weights
        self.backend = backend
        device = weights.embed.device
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float64),
                            rope_inv_freq(cfg))
        # [max_pos, head_dim]: the halves repeated, as rotate_half expects.
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=torch.float32)
        self.sin = emb.sin().to(device=device, dtype=torch.float32)
        self.attn_scale = cfg.head_dim ** -0.5

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, heads, head_dim]."""
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def linear(self, x: torch.Tensor, layer: int, module: str, pool: UnifiedPool,
               lora: LoraBatch) -> torch.Tensor:
        y = x @ self.w.layers[layer][module].T
        if lora.any_lora:
            m = LORA_MODULE_INDEX[module]
            pages = pool.layer(layer)
            table, ranks = pool.lora_page_table[m], pool.lora_ranks[m]
            v = self.backend.lora_shrink(x, pages, table, ranks, lora)
            self.backend.lora_expand(y, v, pages, table, ranks, pool.lora_scales[m], lora)
        return y

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: UnifiedPool) -> torch.Tensor:
        """Returns float32 logits [num_sampled, vocab]."""
        cfg = self.cfg
        num_tokens = batch.input_ids.shape[0]
        h = self.w.embed[batch.input_ids]  # [num_tokens, H]
        for i, lw in enumerate(self.w.layers):
            x = self.rms_norm(h, lw["input_norm"])
            q = self.linear(x, i, "q_proj", pool, batch.lora)
            k = self.linear(x, i, "k_proj", pool, batch.lora)
            v = self.linear(x, i, "v_proj", pool, batch.lora)
            q = self.rope(q.view(num_tokens, cfg.num_heads, cfg.head_dim), batch.positions)
            k = self.rope(k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), batch.positions)
            pages = pool.layer(i)
            self.backend.store_kv(k.reshape(num_tokens, cfg.kv_dim), v, pages, batch.attn)
            attn = self.backend.paged_attention(q, pages, batch.attn, cfg.num_kv_heads,
                                                self.attn_scale)
            h = h + self.linear(attn.reshape(num_tokens, cfg.q_dim), i, "o_proj", pool,
                                batch.lora)
            x = self.rms_norm(h, lw["post_norm"])
            gate = self.linear(x, i, "gate_proj", pool, batch.lora)
            up = self.linear(x, i, "up_proj", pool, batch.lora)
            h = h + self.linear(F.silu(gate) * up, i, "down_proj", pool, batch.lora)
        h = self.rms_norm(h[batch.logits_indices], self.w.norm)
        return (h @ self.w.lm_head.T).float()
