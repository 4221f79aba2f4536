"""Qwen2 and Qwen2.5: Llama's layers with a bias on q, k and v, tied embeddings in the small
sizes (0.5B, 1.5B, 3B), full attention (its `use_sliding_window` is refused)."""
from __future__ import annotations

from slora.models.family import LAYER, Family, hf_model_config, no_sliding_window, preset
from slora.models.llama import CHECKPOINT_NAMES as LLAMA_NAMES

CHECKPOINT_NAMES = {
    **LLAMA_NAMES,
    **{f"model.layers.{LAYER}.self_attn.{m}.bias": (f"layers.{LAYER}.self_attn.qkv_proj.bias", m)
       for m in ("q_proj", "k_proj", "v_proj")},
}


def config_from_hf(d: dict, name: str):
    no_sliding_window(d, "qwen2")
    return hf_model_config(d, name, FAMILY, qkv_bias=True)


FAMILY = Family(
    model_type="qwen2", config_from_hf=config_from_hf, checkpoint_names=CHECKPOINT_NAMES,
    presets={  # rope_theta 1e6, rms_norm_eps 1e-6, 32768 positions: as Qwen2.5's configs
        name: preset(*shape, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                     tie_word_embeddings=tied)
        for name, shape, tied in (
            ("dummy-qwen2.5-0.5b", (151936, 896, 4864, 24, 14, 2), True),
            ("dummy-qwen2.5-7b", (152064, 3584, 18944, 28, 28, 4), False))
    })
