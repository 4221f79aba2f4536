"""Mistral: Llama's layers and checkpoint names, with sliding-window attention served
exactly (each token attends to the last `sliding_window` positions, itself included)."""
from __future__ import annotations

from slora.models.family import Family, hf_model_config, preset, refuse
from slora.models.llama import CHECKPOINT_NAMES


def config_from_hf(d: dict, name: str):
    if d.get("attention_bias"):
        refuse(d, "mistral", "attention_bias", "Mistral has no projection biases")
    window = d.get("sliding_window") or 0
    if window and window >= d.get("max_position_embeddings", 4096):
        window = 0  # no context reaches past it: full attention, exactly
    return hf_model_config(d, name, FAMILY, sliding_window=int(window))


FAMILY = Family(
    model_type="mistral", config_from_hf=config_from_hf, checkpoint_names=CHECKPOINT_NAMES,
    presets={
        "dummy-mistral-7b": preset(32000, 4096, 14336, 32, 32, 8, sliding_window=4096,
                                   max_position_embeddings=32768),
    })
