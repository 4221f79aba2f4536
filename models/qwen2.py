"""Qwen2 and Qwen2.5: Llama's layers with a bias on q, k and v, tied embeddings in the small
sizes (0.5B, 1.5B, 3B), full attention (its `use_sliding_window` is refused)."""
from __future__ import annotations

from slora.models.family import LAYER, Family, hf_model_config, no_sliding_window
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
    presets={
        "dummy-qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=1000000.0, max_position_embeddings=32768,
                                   rms_norm_eps=1e-6),
        "dummy-qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, rope_theta=1000000.0,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6),
    })
