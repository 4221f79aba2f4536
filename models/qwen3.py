"""Qwen3: Llama's layers with an RMSNorm over each q and k head before the rotary embedding
(q_norm, k_norm), head_dim given by the config (not hidden / heads), no bias."""
from __future__ import annotations

from slora.models.family import LAYER, Family, hf_model_config, no_sliding_window, refuse
from slora.models.llama import CHECKPOINT_NAMES as LLAMA_NAMES

CHECKPOINT_NAMES = {
    **LLAMA_NAMES,
    **{f"model.layers.{LAYER}.self_attn.{n}.weight": (f"layers.{LAYER}.self_attn.{n}.weight",
                                                       None) for n in ("q_norm", "k_norm")},
}


def config_from_hf(d: dict, name: str):
    no_sliding_window(d, "qwen3")
    if d.get("attention_bias"):
        refuse(d, "qwen3", "attention_bias", "Qwen3 checkpoints with projection biases are "
               "not served")
    return hf_model_config(d, name, FAMILY, qk_norm=True)


FAMILY = Family(
    model_type="qwen3", config_from_hf=config_from_hf, checkpoint_names=CHECKPOINT_NAMES,
    presets={
        "dummy-qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                 num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                                 rope_theta=1000000.0, max_position_embeddings=40960,
                                 rms_norm_eps=1e-6),
        "dummy-qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                               num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                               max_position_embeddings=40960, rms_norm_eps=1e-6),
    })
