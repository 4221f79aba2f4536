"""Base-model weights: read from a Hugging Face folder (config.json + *.safetensors, with
or without the index file) or made from a seed (`dummy`), for benchmarks."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from slora.common.config import ModelConfig
from slora.common.errors import ConfigError

LAYER_PARAMS = {
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight",
}


@dataclass
class LlamaWeights:
    embed: torch.Tensor
    """[vocab, H]"""
    layers: list[dict[str, torch.Tensor]]
    """Per layer: each projection as nn.Linear stores it, [out, in]; the two norms [H]."""
    norm: torch.Tensor
    lm_head: torch.Tensor
    """[vocab, H]; the embedding itself when tied."""


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(reversed(cfg.module_shape(k))) for k in LAYER_PARAMS if k.endswith("proj")}
    shapes["input_norm"] = shapes["post_norm"] = (cfg.hidden_size,)
    return shapes


def load_hf_weights(cfg: ModelConfig, path: str, dtype: torch.dtype,
                    device: torch.device) -> LlamaWeights:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        if glob.glob(os.path.join(path, "*.bin")):
            raise ConfigError(f"model folder {path!r} has only pickle (.bin) weights; "
                              "convert them to safetensors")
        raise ConfigError(f"model folder {path!r} has no *.safetensors files")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError(f"model folder {path!r}: tensor {name!r} is missing")
        t = tensors.pop(name)
        if tuple(t.shape) != shape:
            raise ConfigError(f"model folder {path!r}: {name} has shape {tuple(t.shape)}, "
                              f"expected {shape}")
        return t.to(device=device, dtype=dtype).contiguous()

    shapes = _expected_shapes(cfg)
    embed = take("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    layers = [{k: take(f"model.layers.{i}.{suffix}", shapes[k])
               for k, suffix in LAYER_PARAMS.items()} for i in range(cfg.num_layers)]
    norm = take("model.norm.weight", (cfg.hidden_size,))
    if "lm_head.weight" in tensors and not cfg.tie_word_embeddings:
        lm_head = take("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    else:
        tensors.pop("lm_head.weight", None)
        lm_head = embed
    tensors = {k: v for k, v in tensors.items() if "rotary_emb" not in k}
    if tensors:
        raise ConfigError(f"model folder {path!r}: unexpected tensors {sorted(tensors)[:5]}")
    return LlamaWeights(embed, layers, norm, lm_head)


def dummy_weights(cfg: ModelConfig, seed: int, dtype: torch.dtype,
                  device: torch.device) -> LlamaWeights:
    """Seeded random weights of the model's real shapes (made on the device: fast)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
                * std).to(dtype)

    shapes = _expected_shapes(cfg)
    layers = []
    for _ in range(cfg.num_layers):
        layer = {k: rand(*shapes[k]) for k in LAYER_PARAMS if k.endswith("proj")}
        layer["input_norm"] = torch.ones(cfg.hidden_size, dtype=dtype, device=device)
        layer["post_norm"] = torch.ones(cfg.hidden_size, dtype=dtype, device=device)
        layers.append(layer)
    embed = rand(cfg.vocab_size, cfg.hidden_size)
    lm_head = embed if cfg.tie_word_embeddings else rand(cfg.vocab_size, cfg.hidden_size)
    return LlamaWeights(embed, layers, torch.ones(cfg.hidden_size, dtype=dtype, device=device),
                        lm_head)
