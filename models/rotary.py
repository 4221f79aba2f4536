"""Rotary position embeddings, with the rope scalings the families use (default; llama3).

`RotaryEmbedding` holds the float32 tables the backend's fused rope-and-store kernel reads
(kernels/torch_ref.py rope_store_kv): cos [max_positions, head_dim] with the halves repeated,
as rotate_half expects, and the sine with its first half negated, so that
rotate_half(x) * sin == roll(x, half) * sin_signed.
"""
from __future__ import annotations

import math

import torch

from slora.common.errors import ConfigError

ROPE_TYPES = ("default", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim / 2] float64 inverse frequencies, scaled as `scaling` says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported "
                          f"({', '.join(ROPE_TYPES)})")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict | None):
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(positions, rope_inv_freq(head_dim, theta, scaling))
        self.register_buffer("cos", torch.cat([freqs, freqs], dim=-1).cos().float(),
                             persistent=False)
        self.register_buffer("sin_signed", torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
                             .float(), persistent=False)
