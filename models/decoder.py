"""The decoder every family builds: embedding, layers of (norm, self-attention, norm, MLP)
on a residual stream, final norm, lm_head; its forward pass over one step's batch.

A family (llama.py, mistral.py, qwen2.py, qwen3.py) picks the features of the shared layers
through its ModelConfig (q/k/v bias, q/k norm, sliding window) and says how its checkpoint's
tensor names map onto `CausalLM.named_parameters()` (models/loader.py reads them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slora.common.config import ModelConfig
from slora.kernels.backend import AttentionBatch, LoraBatch
from slora.models.attention import SelfAttention
from slora.models.embedding import LMHead, VocabEmbedding
from slora.models.linear import ColumnParallelLinear, ParallelLinear, RowParallelLinear
from slora.models.norm import RMSNorm
from slora.models.parallel import TensorParallel
from slora.models.rotary import RotaryEmbedding


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


@dataclass
class StepContext:
    """What the layers read besides their input: the kernels, the pool (pages and LoRA
    tables, worker/pool.py UnifiedPool) and the step's batch."""

    backend: object
    pool: object
    attn: AttentionBatch
    lora: LoraBatch


class MLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up one column-parallel GEMM."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(cfg, tp, layer, cfg.hidden_size,
                                                 ("gate_proj", "up_proj"))
        self.down_proj = RowParallelLinear(cfg, tp, layer, "down_proj", cfg.hidden_size)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, ctx)  # [num_tokens, 2 inter_local]
        return self.down_proj(ctx.backend.silu_mul(gate_up), ctx)


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, tp, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp, layer)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None, positions: torch.Tensor,
                rotary: RotaryEmbedding, ctx: StepContext) -> torch.Tensor:
        """h: the residual stream, updated in place; delta: what the last sublayer adds to h
        (each norm adds it first, in one kernel). Returns this layer's MLP output."""
        x = self.input_layernorm(h, delta, ctx)
        o = self.self_attn(x, positions, rotary, ctx)
        x = self.post_attention_layernorm(h, o, ctx)
        return self.mlp(x, ctx)


class CausalLM(torch.nn.Module):
    """A decoder-only model over the unified pool. Parameter names follow the Hugging Face
    module tree (`layers.{i}.self_attn.qkv_proj.weight`, ...), fused projections included."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, backend):
        super().__init__()
        self.cfg, self.tp, self.backend = cfg, tp, backend
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, tp, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        tied = self.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tp, tied)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings,
                                      cfg.rope_theta, cfg.rope_scaling)

    def linears(self) -> list[ParallelLinear]:
        return [m for m in self.modules() if isinstance(m, ParallelLinear)]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool) -> torch.Tensor:
        """Returns float32 logits [num_sampled, vocab] ([num_tokens, vocab] when
        batch.logits_indices is None)."""
        ctx = StepContext(self.backend, pool, batch.attn, batch.lora)
        h = self.embed_tokens(batch.input_ids)  # [num_tokens, H]: the residual stream
        delta = None
        for layer in self.layers:
            delta = layer(h, delta, batch.positions, self.rotary, ctx)
        x = self.norm(h, delta, ctx)  # per row: the same before or after picking the rows
        if batch.logits_indices is not None:
            x = x[batch.logits_indices]
        return self.lm_head(x)
