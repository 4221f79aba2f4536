"""Qwen3: Llama's layers with an RMSNorm over each q and k head before the rotary embedding
(q_norm, k_norm), head_dim given by the config (not hidden / heads), no bias."""
from __future__ import annotations

from slora.models.family import LAYER, Family, hf_model_config, no_sliding_window, preset, refuse
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
    presets={  # head_dim 128 at every size, apart from hidden / heads (0.6B: 1024 / 16)
        "dummy-qwen3-0.6b": preset(151936, 1024, 3072, 28, 16, 8, head_dim=128,
                                   tie_word_embeddings=True, rope_theta=1e6,
                                   max_position_embeddings=40960, rms_norm_eps=1e-6),
        "dummy-qwen3-8b": preset(151936, 4096, 12288, 36, 32, 8, head_dim=128,
                                 rope_theta=1e6, max_position_embeddings=40960,
                                 rms_norm_eps=1e-6),
    })
