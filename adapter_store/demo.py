"""Seeded random LoRA adapters of a model's real shapes, as PEFT folders: for demos and
for benchmarks that register adapters through the API. No peft needed: the folder is
written as PEFT writes it (adapter_config.json + adapter_model.safetensors)."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from slora.common.config import ModelConfig

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def demo_adapter_tensors(cfg: ModelConfig, rank: int, targets: tuple[str, ...], seed: int,
                         dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT-named tensors: lora_A [r, d_in] ~ N(0, 1/d_in), lora_B [d_out, r] small."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in targets:
            d_in, d_out = cfg.module_shape(module)
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(d_out, rank, generator=gen) * 0.01).to(dtype)
    return tensors


def write_demo_adapter(out_dir: str, cfg: ModelConfig, rank: int, seed: int,
                       targets: tuple[str, ...] | None = None, lora_alpha: float | None = None,
                       base_model_name: str | None = None) -> str:
    """`targets`: the projections the adapter targets; None for all of the model's."""
    targets = cfg.lora_modules if targets is None else targets
    os.makedirs(out_dir, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": lora_alpha if lora_alpha is not None else 2 * rank,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "base_model_name_or_path": base_model_name or cfg.name,
    }
    save_file(demo_adapter_tensors(cfg, rank, targets, seed),
              os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def write_demo_adapters(cfg: ModelConfig, out_root: str, count: int, ranks: list[int],
                        seed: int = 0) -> list[str]:
    """`count` adapters named demo-<i>, ranks round-robin from `ranks`."""
    return [write_demo_adapter(os.path.join(out_root, f"demo-{i}"), cfg, ranks[i % len(ranks)],
                               seed + i) for i in range(count)]
