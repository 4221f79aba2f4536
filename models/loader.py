"""Weights into a CausalLM: from a Hugging Face folder (config.json + *.safetensors, with or
without the index file) through the family's checkpoint-name table, each tensor cut to this
rank's shard by its layer's weight_loader; or seeded random weights of the real shapes
(`dummy`, for benchmarks)."""
from __future__ import annotations

import glob
import json
import os
import re

import torch
from safetensors import safe_open

from slora.common.errors import ConfigError
from slora.models.decoder import CausalLM
from slora.models.family import LAYER, Family

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
IGNORED_TENSORS = ("rotary_emb.inv_freq",)
"""Checkpoint tensors recomputed here, not read (older Llama checkpoints carry them)."""


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        if glob.glob(os.path.join(path, "*.bin")):
            raise ConfigError(f"model folder {path!r} has only pickle (.bin) weights; "
                              "convert them to safetensors")
        raise ConfigError(f"model folder {path!r} has no *.safetensors files")
    return files


def expected_tensors(model: CausalLM, family: Family) -> dict[str, tuple[str, str | None]]:
    """Every checkpoint tensor the model needs -> (parameter name, member)."""
    out = {}
    for ckpt, (ours, member) in family.checkpoint_names.items():
        if ckpt == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        if LAYER in ckpt:
            for i in range(model.cfg.num_layers):
                out[ckpt.replace(LAYER, str(i))] = (ours.replace(LAYER, str(i)), member)
        else:
            out[ckpt] = (ours, member)
    return out


def load_checkpoint(model: CausalLM, family: Family, path: str) -> None:
    """Fills every parameter from the folder's tensors, file by file (host memory holds one
    tensor at a time). Raises ConfigError naming a missing, unexpected or misshapen tensor."""
    params = dict(model.named_parameters())
    expected = expected_tensors(model, family)
    missing = set(expected)
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith(IGNORED_TENSORS) or (
                        name == "lm_head.weight" and model.cfg.tie_word_embeddings):
                    continue
                if name not in expected:
                    template = _LAYER_INDEX.sub(f".layers.{LAYER}.", name)
                    what = ("for this family" if template in family.checkpoint_names
                            else f"for a {family.model_type} model")
                    raise ConfigError(f"model folder {path!r}: unexpected tensor {name!r} "
                                      f"({what} of {model.cfg.num_layers} layers)")
                ours, member = expected[name]
                owner = model.get_submodule(ours.rsplit(".", 1)[0])
                load = getattr(owner, "weight_loader", default_weight_loader)
                try:
                    load(params[ours], f.get_tensor(name), member)
                except ConfigError as e:
                    raise ConfigError(f"model folder {path!r}: {name}: {e}") from None
                missing.discard(name)
    if missing:
        raise ConfigError(f"model folder {path!r}: tensors missing: {sorted(missing)[:5]}")


def init_dummy(model: CausalLM, seed: int) -> None:
    """Seeded random weights (N(0, 0.02)) for every projection, embedding and bias; norms
    at one. Made on the model's device: fast."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.copy_(torch.randn(p.shape, generator=gen, device=device,
                                     dtype=torch.float32) * 0.02)


def default_weight_loader(param, loaded: torch.Tensor, member=None) -> None:
    if tuple(loaded.shape) != tuple(param.shape):
        raise ConfigError(f"shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(loaded)


def checkpoint_tensors(model: CausalLM, family: Family) -> dict[str, torch.Tensor]:
    """The model's weights under the family's checkpoint names (one rank, tp size 1): what
    load_checkpoint would read back; views, no copies."""
    assert model.tp.size == 1, "a sharded model holds only its shards"
    params = dict(model.named_parameters())
    out = {}
    for name, (ours, member) in expected_tensors(model, family).items():
        owner = model.get_submodule(ours.rsplit(".", 1)[0])
        tensor = params[ours]
        if member is not None:
            row, m = owner.member(member)
            tensor = tensor.narrow(0, row, m.num_rows)
        out[name] = tensor.data
    return out
