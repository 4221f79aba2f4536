"""Llama (2: multi-head; 3.x: grouped-query with the llama3 rope scaling; SmolLM2): the
shared decoder as it is (models/decoder.py), no bias, full attention."""
from __future__ import annotations

from slora.models.family import LAYER, Family, hf_model_config, preset, refuse

_L = f"model.layers.{LAYER}"
CHECKPOINT_NAMES: dict[str, tuple[str, str | None]] = {
    "model.embed_tokens.weight": ("embed_tokens.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
    f"{_L}.input_layernorm.weight": (f"layers.{LAYER}.input_layernorm.weight", None),
    f"{_L}.post_attention_layernorm.weight":
        (f"layers.{LAYER}.post_attention_layernorm.weight", None),
    **{f"{_L}.self_attn.{m}.weight": (f"layers.{LAYER}.self_attn.qkv_proj.weight", m)
       for m in ("q_proj", "k_proj", "v_proj")},
    f"{_L}.self_attn.o_proj.weight": (f"layers.{LAYER}.self_attn.o_proj.weight", None),
    **{f"{_L}.mlp.{m}.weight": (f"layers.{LAYER}.mlp.gate_up_proj.weight", m)
       for m in ("gate_proj", "up_proj")},
    f"{_L}.mlp.down_proj.weight": (f"layers.{LAYER}.mlp.down_proj.weight", None),
}
"""Hugging Face's Llama tensor names; q, k, v fill the fused qkv_proj, gate and up the
fused gate_up_proj. The other families start from this table."""


def config_from_hf(d: dict, name: str):
    if d.get("attention_bias"):
        refuse(d, "llama", "attention_bias", "Llama checkpoints with projection biases are "
               "not served")
    return hf_model_config(d, name, FAMILY)


FAMILY = Family(
    model_type="llama", config_from_hf=config_from_hf, checkpoint_names=CHECKPOINT_NAMES,
    presets={
        "dummy-tiny": preset(512, 64, 160, 2, 4, 2, max_position_embeddings=2048),
        "dummy-llama-7b": preset(32000, 4096, 11008, 32, 32, 32),
        "dummy-llama-13b": preset(32000, 5120, 13824, 40, 40, 40),
        "dummy-llama-30b": preset(32000, 6656, 17920, 60, 52, 52),
        "dummy-llama-3-8b": preset(128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0,
                                   max_position_embeddings=8192),
    })
