"""The families slora serves, picked by config.json's model_type, and the model built from
one: `model_config_from_folder`, `dummy_model_config` (the `dummy-<family>-<size>` presets),
`build_model` (the layers on the device, weights loaded or seeded)."""
from __future__ import annotations

import json
import os

import torch

from slora.common.config import ModelConfig
from slora.common.errors import ConfigError
from slora.models import llama, mistral, qwen2, qwen3
from slora.models.decoder import CausalLM
from slora.models.family import Family
from slora.models.loader import init_dummy, load_checkpoint
from slora.models.parallel import SINGLE, TensorParallel

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}
DUMMY_MODELS: dict[str, tuple[Family, dict]] = {
    name: (f, fields) for f in FAMILIES.values() for name, fields in f.presets.items()}
"""Real model shapes with seeded random weights, for benchmarks (as the paper's own are)."""


def family_of(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"model config: model_type {model_type!r} is not supported; "
                          f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def model_config_from_hf(d: dict, name: str) -> ModelConfig:
    """A config.json's model, by its family. Raises ConfigError naming an unknown
    model_type or a feature of a known one that slora does not serve."""
    return family_of(d.get("model_type", "llama")).config_from_hf(d, name)


def model_config_from_folder(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"model folder {path!r} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    return model_config_from_hf(d, os.path.basename(os.path.normpath(path)))


def dummy_model_config(name: str) -> ModelConfig:
    if name not in DUMMY_MODELS:
        raise ConfigError(f"unknown dummy model {name!r}; known: {', '.join(DUMMY_MODELS)}")
    family, fields = DUMMY_MODELS[name]
    d = dict(fields, model_type=family.model_type, bos_token_id=1, eos_token_id=2)
    return family.config_from_hf(d, name)


def build_model(cfg: ModelConfig, path: str | None, backend, dtype: torch.dtype,
                device: torch.device, seed: int = 0, tp: TensorParallel = SINGLE) -> CausalLM:
    """The family's model on `device` in `dtype`, its weights read from the folder `path`
    (None: seeded random weights), ready to run (LoRA groups made on the device)."""
    family = family_of(cfg.model_type)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in the serving dtype, not float32 first
    try:
        with torch.device(device):
            model = CausalLM(cfg, tp, backend)
    finally:
        torch.set_default_dtype(default_dtype)
    if path is None:
        init_dummy(model, seed)
    else:
        load_checkpoint(model, family, path)
    for linear in model.linears():
        linear.make_lora_groups()
    return model.eval()
