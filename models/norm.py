"""RMSNorm, as Hugging Face computes it: the norm in float32, rounded to the input's dtype,
then times the weight. The decoder's norm also adds the last sublayer's output into the
residual stream first (one fused kernel on CUDA: kernels/ add_rms_norm)."""
from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """Replicated on every rank (the residual stream is whole on each)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None, ctx) -> torch.Tensor:
        """h += delta in place (when given), returns the normalised h."""
        return ctx.backend.add_rms_norm(h, delta, self.weight, self.eps)


class HeadNorm(torch.nn.Module):
    """RMSNorm over each head of width head_dim (Qwen3's q_norm and k_norm): one weight of
    head_dim shared by the heads, applied inside the backend's rope_store_kv."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(head_dim), requires_grad=False)
