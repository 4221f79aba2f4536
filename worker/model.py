"""The Llama architecture over the unified pool, with batched multi-adapter LoRA.

Base and LoRA compute stay separate (never merged): for each projection
`y = x W^T + scale_i * (x A_i^T) B_i^T`, where `x W^T` is one dense GEMM for the whole
batch and the LoRA part is the backend's shrink / expand over the adapters' pages, with
every token free to use its own adapter and rank. The projections that share an input and a
fused output (q, k, v; gate, up) run their LoRA as one group (`LORA_GROUPS`): for decode
tokens one kernel launch per group and layer.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from slora.common.config import LORA_MODULE_INDEX, ModelConfig
from slora.kernels.backend import NO_WINDOW, AttentionBatch, LoraBatch, LoraGroup
from slora.worker.pool import UnifiedPool
from slora.worker.weights import LlamaWeights


LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
"""Each (fused) projection of a layer, and the LoRA modules whose outputs are its columns,
in order."""


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
    """Everything one forward pass needs, as device tensors (worker/batch.py builds it)."""

    input_ids: torch.Tensor
    """[num_tokens] int32"""
    positions: torch.Tensor
    """[num_tokens] int32"""
    attn: AttentionBatch
    lora: LoraBatch
    logits_indices: torch.Tensor | None
    """[num_sampled] int32: the tokens whose next-token logits are needed; None for every
    token (a CUDA graph's decode batch: sampling picks its rows afterwards)."""


class LlamaModel:
    """Takes ownership of `weights`: the q, k, v projections are fused into one matrix
    ("qkv_proj") and gate and up into another ("gate_up_proj"), so that a layer is four
    GEMMs; the LoRA of each module adds into its columns of the fused output."""

    def __init__(self, cfg: ModelConfig, weights: LlamaWeights, backend):
        self.cfg = cfg
        self.w = weights
        self.backend = backend
        for layer in weights.layers:  # one layer at a time: memory grows by a layer at most
            layer["qkv_proj"] = torch.cat(
                [layer.pop("q_proj"), layer.pop("k_proj"), layer.pop("v_proj")])
            layer["gate_up_proj"] = torch.cat([layer.pop("gate_proj"), layer.pop("up_proj")])
        device = weights.embed.device
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float64),
                            rope_inv_freq(cfg))
        # [max_pos, head_dim]: the halves repeated, as rotate_half expects; the sine's
        # first half negated, so that rotate_half(x) * sin == roll(x, half) * sin_signed.
        self.cos = torch.cat([freqs, freqs], dim=-1).cos().to(device=device, dtype=torch.float32)
        self.sin_signed = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(
            device=device, dtype=torch.float32)
        self.attn_scale = cfg.head_dim ** -0.5
        self.lora_groups = self._lora_groups(device)

    def _lora_groups(self, device) -> dict[str, dict[frozenset[str], LoraGroup]]:
        """Per fused projection, a LoraGroup for every non-empty subset of its modules (a
        step runs LoRA only for the modules its adapters target); made here, since a CUDA
        graph capture cannot copy them to the device."""
        cfg = self.cfg
        widths = {"q_proj": cfg.q_dim, "k_proj": cfg.kv_dim, "v_proj": cfg.kv_dim,
                  "o_proj": cfg.hidden_size, "gate_proj": cfg.intermediate_size,
                  "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}
        groups = {}
        for name, modules in LORA_GROUPS.items():
            cols, col = {}, 0
            for module in modules:
                cols[module] = (LORA_MODULE_INDEX[module], col, widths[module])
                col += widths[module]
            groups[name] = {}
            for n in range(1, len(modules) + 1):
                for subset in itertools.combinations(modules, n):
                    members = tuple(cols[m] for m in subset)
                    table = torch.tensor(members, dtype=torch.int32, device=device)
                    groups[name][frozenset(subset)] = LoraGroup(members, table)
        return groups

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: str,
                 pool: UnifiedPool, lora: LoraBatch, *, after_base_gemm: bool = False) -> None:
        """y += each token's adapter's LoRA of the modules of `projection` (LORA_GROUPS)
        applied to x, in place, each into its columns of y. after_base_gemm: called right
        behind the GEMM that made y (see Backend.lora_group)."""
        modules = frozenset(LORA_GROUPS[projection])
        if lora.modules is not None:
            modules &= lora.modules
        if not modules:
            return
        self.backend.lora_group(y, x, pool.layer(layer), pool.lora_tables,
                                self.lora_groups[projection][modules], lora,
                                after_base_gemm=after_base_gemm)

    def linear(self, x: torch.Tensor, layer: int, projection: str, pool: UnifiedPool,
               lora: LoraBatch) -> torch.Tensor:
        y = x @ self.w.layers[layer][projection].T
        if lora.any_lora:
            self.add_lora(y, x, layer, projection, pool, lora, after_base_gemm=True)
        return y

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: UnifiedPool) -> torch.Tensor:
        """Returns float32 logits [num_sampled, vocab] ([num_tokens, vocab] when
        batch.logits_indices is None)."""
        cfg, lora = self.cfg, batch.lora
        num_tokens = batch.input_ids.shape[0]
        nh, nkv = cfg.num_heads, cfg.num_kv_heads
        be, eps = self.backend, cfg.rms_norm_eps
        h = self.w.embed[batch.input_ids]  # [num_tokens, H]: the residual stream
        delta = None  # what the last sublayer adds to h (the next norm adds it first)
        for i, lw in enumerate(self.w.layers):
            x = be.add_rms_norm(h, delta, lw["input_norm"], eps)
            qkv = self.linear(x, i, "qkv_proj", pool, lora)  # [num_tokens, q_dim + 2 kv_dim]
            pages = pool.layer(i)
            # q and k rotated, k and v stored into the new tokens' pages: [num_tokens, nh, hd]
            q = be.rope_store_kv(qkv, batch.positions, self.cos, self.sin_signed, pages,
                                 batch.attn, nh, nkv)
            attn = be.paged_attention(q, pages, batch.attn, nkv, self.attn_scale,
                                      sliding_window=NO_WINDOW)  # Llama: the whole context
            o = self.linear(attn.reshape(num_tokens, cfg.q_dim), i, "o_proj", pool, lora)
            x = be.add_rms_norm(h, o, lw["post_norm"], eps)
            gate_up = self.linear(x, i, "gate_up_proj", pool, lora)  # [num_tokens, 2 inter]
            delta = self.linear(be.silu_mul(gate_up), i, "down_proj", pool, lora)
        x = be.add_rms_norm(h, delta, self.w.norm, eps)  # per row: the same before or
        if batch.logits_indices is not None:           # after picking the sampled rows
            x = x[batch.logits_indices]
        return (x @ self.w.lm_head.T).float()
