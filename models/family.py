"""What a family module declares (llama.py, mistral.py, qwen2.py, qwen3.py), and the
config.json reading they share.

A family says: its config.json model_type; the projections its adapters may target; one
table from its checkpoint's tensor names to the shared decoder's parameters (models/
decoder.py), with the member of a fused projection each fills; how its config.json maps onto
ModelConfig, refusing by name what slora does not serve; its `dummy-<family>-<size>`
presets (real shapes, seeded random weights, for benchmarks).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from slora.common.config import STANDARD_LORA_MODULES, ModelConfig
from slora.common.errors import ConfigError

LAYER = "{i}"
"""Stands for the layer index in checkpoint-name templates."""


@dataclass(frozen=True)
class Family:
    model_type: str
    config_from_hf: Callable[[dict, str], ModelConfig]
    """config.json (a dict) and the model's name -> its ModelConfig; raises ConfigError."""
    checkpoint_names: dict[str, tuple[str, str | None]]
    """Checkpoint tensor name (LAYER for the layer index) -> (our parameter name, the
    member of a fused projection it fills, or None for the whole parameter)."""
    presets: dict[str, dict] = field(default_factory=dict)
    """dummy-<family>-<size> -> the config.json fields of that model."""
    lora_modules: tuple[str, ...] = STANDARD_LORA_MODULES


def preset(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           **more) -> dict:
    """A dummy preset's config.json fields: the shapes, then anything else by its name."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, **more)


def refuse(d: dict, model_type: str, key: str, why: str) -> None:
    raise ConfigError(f"model config: {model_type} with {key}={d.get(key)!r} is not "
                      f"supported: {why}")


def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 4 (rope_scaling) or 5
    (rope_parameters) config keys."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def hf_model_config(d: dict, name: str, family: Family, **features) -> ModelConfig:
    """The fields every family reads the same way, plus the family's own `features`
    (qkv_bias, qk_norm, sliding_window)."""
    if d.get("hidden_act", "silu") != "silu":
        refuse(d, family.model_type, "hidden_act", "the MLP is SwiGLU (silu)")
    if d.get("mlp_bias"):
        refuse(d, family.model_type, "mlp_bias", "MLP projections have no bias here")
    rope_theta, rope_scaling = _rope(d)
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids, name=name,
            model_type=family.model_type, lora_modules=family.lora_modules, **features)
    except KeyError as e:
        raise ConfigError(f"model config: {family.model_type} config.json has no {e}") from None


def no_sliding_window(d: dict, model_type: str) -> None:
    """Qwen2 and Qwen3 configs name a window that only `use_sliding_window` turns on (for
    the layers past max_window_layers): refused, since those layers' windows differ."""
    if d.get("use_sliding_window"):
        refuse(d, model_type, "use_sliding_window",
               "per-layer sliding windows (max_window_layers) are not served")
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        refuse(d, model_type, "layer_types", "every layer must be full_attention")
