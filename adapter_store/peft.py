"""PEFT LoRA adapters: read, validate, and stack into per-module tensors.

A PEFT folder holds adapter_config.json and adapter_model.safetensors with one lora_A
[r, d_in] and one lora_B [d_out, r] per targeted module per covered layer, keyed
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight` or any other
layout PEFT's loaders apply (peft_keys.py). Which config fields are served, and which refuse
the adapter, is peft_fields.py. We stack them
over layers: A [num_layers, r, d_in], B [num_layers, d_out, r], zeros at layers the adapter
does not cover, so the worker can copy a module's rank-rows into pool pages in one go.
The LoRA delta of a module at layer l is `scale * (x @ A[l].T) @ B[l].T`.

Which (layer, module) pairs an adapter covers, and each pair's rank and alpha, follow PEFT's
own rules (`check_target_module_exists`, `get_pattern_key` in peft 0.22): target_modules is a
list of names (a module matches when its full name equals one or ends with `.name`) or a regex
full-matched against full names like `model.layers.0.self_attn.q_proj`; layers_to_transform,
exclude_modules, rank_pattern and alpha_pattern apply as PEFT applies them. Where the patterns
give one module different ranks at different layers, that module's rank is the largest and the
smaller layers are zero-padded; where they give it different scales, `module_scales` holds the
first covered layer's and the ratio is folded into B at the others, so one scale per module
is always exact.

Pickles are never opened: `.bin` adapters are refused, and the safetensors header is checked
(safetensors_check.py) before the safetensors library reads the file, so a pickle renamed to
.safetensors, or a hostile header, is refused unread. Every refusal is an AdapterError naming
the adapter, the file and what is wrong.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from slora.adapter_store.peft_fields import check_fields, check_shape_fields
from slora.adapter_store.peft_keys import (
    KeyLayout, canonical_key, module_full_name,
)
from slora.adapter_store.safetensors_check import SafetensorsHeaderError, check_safetensors
from slora.common.config import STANDARD_LORA_MODULES, ModelConfig
from slora.common.errors import AdapterBaseModelMismatch, AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

def _other_module_names(model: ModelConfig) -> list[str]:
    """Every other module name of the model's Hugging Face module tree (the same in every
    family slora serves, Qwen3's q/k norms aside), and the projections the family's adapters
    may not target: what target_modules must not match."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb",
             "lm_head"]
    untargeted = [m for m in STANDARD_LORA_MODULES if m not in model.lora_modules]
    for i in range(model.num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm",
                  f"{p}.post_attention_layernorm"]
        names += [f"{p}.self_attn.{n}" for n in ("q_norm", "k_norm") if model.qk_norm]
        names += [module_full_name(i, m) for m in untargeted]
    return names


@dataclass
class AdapterSpec:
    """What adapter_config.json says, checked against the model and the pool; no tensors."""

    adapter_id: str
    path: str
    base_model_name: str | None
    """PEFT's base_model_name_or_path (a hub name or a local path), None when absent."""
    module_ranks: dict[str, int]
    """Rank of each targeted module (short name, the model's lora_modules order); untargeted
    are absent."""
    module_scales: dict[str, float]
    """The factor the kernel applies to each targeted module: lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora, after rank_pattern / alpha_pattern."""
    rank: int
    """max(module_ranks.values())."""
    lora_alpha: float
    use_rslora: bool
    layer_ranks: dict[str, tuple[int, ...]]
    """Per targeted module, its rank at each layer: [num_layers], 0 where not covered."""
    layer_scales: dict[str, tuple[float, ...]]
    """Per targeted module, PEFT's scale at each layer: [num_layers], 0.0 where not covered."""

    def num_pages(self, model: ModelConfig) -> int:
        """Pages this adapter takes in the unified pool."""
        return model.adapter_num_pages(self.module_ranks)


@dataclass
class LoraAdapter(AdapterSpec):
    """A parsed adapter: the spec plus its weights, on CPU, contiguous, in one dtype."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """module -> (A [num_layers, r, d_in], B [num_layers, d_out, r]), r = module_ranks[module];
    zero at layers (and rank-rows) the adapter does not cover. B already carries any per-layer
    scale ratio (see the module docstring), so delta = module_scales[m] * x A[l]^T B[l]^T."""

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ab in self.weights.values() for t in ab)


def _load_config_json(adapter_id: str, path: str) -> tuple[dict, str]:
    if not os.path.exists(path):
        raise AdapterError(adapter_id, path, "adapter path does not exist")
    if not os.path.isdir(path):
        raise AdapterError(adapter_id, path, "adapter path is not a directory (expected a "
                           f"PEFT folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise AdapterError(adapter_id, cfg_file, f"{CONFIG_FILE} is missing")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(adapter_id, cfg_file, f"not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(adapter_id, cfg_file,
                           f"expected a JSON object, found {type(cfg).__name__}")
    return cfg, cfg_file


def _weights_file(adapter_id: str, path: str) -> str:
    weights = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(weights):
        return weights
    pickle_file = os.path.join(path, PICKLE_FILE)
    if os.path.exists(pickle_file):
        raise AdapterError(adapter_id, pickle_file,
                           "pickle adapters are refused; convert to safetensors "
                           f"({WEIGHTS_FILE})")
    raise AdapterError(adapter_id, weights, f"{WEIGHTS_FILE} is missing")


class _Targets:
    """PEFT's check_target_module_exists for one adapter config, on our module names."""

    def __init__(self, cfg: dict):
        self.target_modules = cfg.get("target_modules")
        self.exclude_modules = cfg.get("exclude_modules")
        self.layers_to_transform = cfg.get("layers_to_transform")
        self.layers_pattern = cfg.get("layers_pattern")

    def excluded(self, key: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, key) is not None
        return key in ex or any(key.endswith(f".{e}") for e in ex)

    def matches(self, key: str) -> bool:
        if self.excluded(key):
            return False
        targets = self.target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, key) is not None
        if key in targets:
            return True
        if not any(key.endswith(f".{t}") for t in targets):
            return False
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        patterns = self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern that matches a suffix of the key wins."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def _check_config_fields(adapter_id: str, cfg_file: str, cfg: dict, model: ModelConfig,
                         max_rank: int) -> None:
    """Refuse what we cannot serve (peft_fields.py), before working out coverage."""
    reason = check_fields(cfg) or check_shape_fields(cfg, model, max_rank)
    if reason is not None:
        raise AdapterError(adapter_id, cfg_file, reason)


def _check_targets(adapter_id: str, cfg_file: str, targets: _Targets,
                   model: ModelConfig) -> None:
    """target_modules may match only the projections the model's family serves LoRA on."""
    proj_names = [module_full_name(i, m) for i in range(model.num_layers)
                  for m in model.lora_modules]
    others = [n for n in _other_module_names(model) if targets.matches(n)]
    if others:
        served = ", ".join(m.removesuffix("_proj") for m in model.lora_modules)
        raise AdapterError(adapter_id, cfg_file,
                           f"target_modules {targets.target_modules!r} matches {others[0]!r}; "
                           f"only the {served} projections can be served on this "
                           f"{model.model_type} model")
    entries = ([targets.target_modules] if isinstance(targets.target_modules, str)
               else targets.target_modules)
    for entry in entries:
        hit = (re.fullmatch(entry, n) if isinstance(targets.target_modules, str)
               else n == entry or n.endswith(f".{entry}") for n in proj_names)
        if not any(hit):
            raise AdapterError(adapter_id, cfg_file,
                               f"target_modules entry {entry!r} matches none of the q, k, v, "
                               "o, gate, up, down projections of this model")


def read_adapter_config(adapter_id: str, path: str, model: ModelConfig,
                        max_rank: int) -> AdapterSpec:
    """Validate a PEFT folder's adapter_config.json against the model and the pool's
    max_lora_rank, and check a safetensors weights file is there; reads no tensors."""
    return _read_config(adapter_id, path, model, max_rank)[0]


def _read_config(adapter_id: str, path: str, model: ModelConfig,
                 max_rank: int) -> tuple[AdapterSpec, dict]:
    cfg, cfg_file = _load_config_json(adapter_id, path)
    _check_config_fields(adapter_id, cfg_file, cfg, model, max_rank)
    _weights_file(adapter_id, path)
    targets = _Targets(cfg)
    _check_targets(adapter_id, cfg_file, targets, model)
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    use_rslora = cfg.get("use_rslora", False)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    layer_ranks: dict[str, tuple[int, ...]] = {}
    layer_scales: dict[str, tuple[float, ...]] = {}
    for m in model.lora_modules:
        ranks, scales = [], []
        for i in range(model.num_layers):
            key = module_full_name(i, m)
            if not targets.matches(key):
                ranks.append(0)
                scales.append(0.0)
                continue
            r_l = _pattern_value(rank_pattern, key, r)
            a_l = float(_pattern_value(alpha_pattern, key, alpha))
            ranks.append(r_l)
            scales.append(a_l / math.sqrt(r_l) if use_rslora else a_l / r_l)
        if any(ranks):
            layer_ranks[m], layer_scales[m] = tuple(ranks), tuple(scales)
    if not layer_ranks:
        raise AdapterError(adapter_id, cfg_file,
                           f"target_modules {cfg['target_modules']!r} covers no projection "
                           "of this model")
    module_ranks = {m: max(rs) for m, rs in layer_ranks.items()}
    # The first non-zero layer scale (uncovered layers hold 0.0; an alpha of 0 is legal and
    # leaves 0.0), so folding the other layers' ratios into B never divides by zero.
    module_scales = {m: next((s for s in layer_scales[m] if s), 0.0) for m in layer_ranks}
    base = cfg.get("base_model_name_or_path") or None
    return AdapterSpec(
        adapter_id=adapter_id, path=path, base_model_name=base if isinstance(base, str) else None,
        module_ranks=module_ranks, module_scales=module_scales, rank=max(module_ranks.values()),
        lora_alpha=alpha, use_rslora=use_rslora, layer_ranks=layer_ranks,
        layer_scales=layer_scales), cfg


def _parse_keys(adapter_id: str, file: str, keys, spec: AdapterSpec, cfg: dict,
                model: ModelConfig) -> dict[str, tuple[int, str, str]]:
    """key -> (layer, module, "A" | "B") for every LoRA weight key (peft_keys.py), checked
    against the config; keys to skip are left out. An AdapterError names any other key."""
    layout = KeyLayout(skip_velora=bool(cfg.get("velora_config")))
    parsed = {}
    for key in keys:
        try:
            parts = layout.parse(key)
        except ValueError as e:
            raise AdapterError(adapter_id, file, str(e)) from None
        if parts is None:
            continue
        layer, _, module, which = parts
        if layer >= model.num_layers:  # a deeper model's adapter
            raise AdapterBaseModelMismatch(
                adapter_id, file, f"tensor {key!r} is for layer {layer}; this server's base "
                f"model {model.name!r} has layers 0..{model.num_layers - 1}")
        if module not in spec.layer_ranks:
            raise AdapterError(adapter_id, file, f"tensor {key!r} is for {module}, which "
                               "target_modules does not name (targets: "
                               f"{', '.join(spec.layer_ranks)})")
        if spec.layer_ranks[module][layer] == 0:
            raise AdapterError(adapter_id, file, f"tensor {key!r} is for {module} at layer "
                               f"{layer}, which the config does not cover (layers_to_transform "
                               "/ exclude_modules)")
        parsed[key] = (layer, module, which)
    for m, ranks in spec.layer_ranks.items():
        for layer, r_l in enumerate(ranks):
            for which in "AB":
                if r_l and (layer, m, which) not in layout.key_of:
                    raise AdapterError(adapter_id, file,
                                       f"tensor {canonical_key(layer, m, which)!r} is missing: "
                                       f"the config targets {m} at layer {layer}")
    return parsed


def _expected_shape(spec: AdapterSpec, model: ModelConfig, layer: int, module: str,
                    which: str) -> tuple[int, int]:
    r_l, (d_in, d_out) = spec.layer_ranks[module][layer], model.module_shape(module)
    return (r_l, d_in) if which == "A" else (d_out, r_l)


def _check_shape(adapter_id: str, file: str, key: str, shape: tuple[int, ...],
                 spec: AdapterSpec, model: ModelConfig, layer: int, module: str,
                 which: str) -> None:
    """A width that is not the base model's is FAILED_PRECONDITION (trained on another
    base); a rank that is not the config's is INVALID_ARGUMENT."""
    expected = _expected_shape(spec, model, layer, module, which)
    if tuple(shape) == expected:
        return
    rank_axis = 0 if which == "A" else 1
    if len(shape) == 2 and shape[1 - rank_axis] != expected[1 - rank_axis]:
        base = f" (its config names base model {spec.base_model_name!r})" \
            if spec.base_model_name else ""
        raise AdapterBaseModelMismatch(
            adapter_id, file, f"tensor {key!r} ({module} lora_{which} at layer {layer}) has "
            f"shape {list(shape)}; this server's base model {model.name!r} needs "
            f"{list(expected)}, so the adapter was trained on another base model{base}")
    raise AdapterError(adapter_id, file, f"tensor {key!r} has shape {list(shape)}; expected "
                       f"{list(expected)} (rank {expected[rank_axis]} from the config)")


def _check_tensor(adapter_id: str, file: str, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdapterError(adapter_id, file, f"tensor {key!r} has dtype {tensor.dtype}; "
                           "expected a floating-point dtype")
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterError(adapter_id, file, f"tensor {key!r} has NaN or Inf values")


def load_peft_adapter(adapter_id: str, path: str, model: ModelConfig, max_rank: int,
                      dtype: torch.dtype = torch.float32,
                      pin_memory: bool = False) -> LoraAdapter:
    """Read and validate a PEFT folder into a LoraAdapter on CPU in `dtype`.

    pin_memory pins the weights for fast copies to the GPU; it is ignored where CUDA is not
    available (pinning needs a CUDA driver).
    """
    spec, cfg = _read_config(adapter_id, path, model, max_rank)
    file = _weights_file(adapter_id, path)
    pin = pin_memory and torch.cuda.is_available()
    weights = {}
    for m, r in spec.module_ranks.items():
        d_in, d_out = model.module_shape(m)
        weights[m] = (torch.zeros(model.num_layers, r, d_in, dtype=dtype, pin_memory=pin),
                      torch.zeros(model.num_layers, d_out, r, dtype=dtype, pin_memory=pin))
    try:
        header = check_safetensors(file)
    except (SafetensorsHeaderError, OSError) as e:
        raise AdapterError(adapter_id, file, f"not a readable safetensors file ({e})") \
            from None
    # Every name and shape, before any tensor byte.
    parsed = _parse_keys(adapter_id, file, header.tensors, spec, cfg, model)
    for key, (layer, m, which) in parsed.items():
        _check_shape(adapter_id, file, key, header.tensors[key].shape, spec, model, layer, m,
                     which)
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise AdapterError(adapter_id, file, f"not a readable safetensors file ({e})") from None
    with handle as f:
        if set(f.keys()) != set(header.tensors):
            raise AdapterError(adapter_id, file, "the safetensors library reads other tensor "
                               "names than the file's header holds")
        for key, (layer, m, which) in parsed.items():
            try:
                tensor = f.get_tensor(key)
            except Exception as e:
                raise AdapterError(adapter_id, file, f"tensor {key!r} cannot be read ({e})") \
                    from None
            _check_tensor(adapter_id, file, key, tensor)
            _check_shape(adapter_id, file, key, tuple(tensor.shape), spec, model, layer, m,
                         which)
            r_l = spec.layer_ranks[m][layer]
            a, b = weights[m]
            if which == "A":
                a[layer, :r_l] = tensor
            else:
                scale = spec.module_scales[m]
                ratio = spec.layer_scales[m][layer] / scale if scale else 1.0
                b[layer, :, :r_l] = tensor.float() * ratio if ratio != 1.0 else tensor
    return LoraAdapter(**vars(spec), weights=weights)


def _normalize_name(name: str) -> str:
    return os.path.basename(os.path.normpath(name.strip())).lower()


def base_model_warning(adapter_id: str, adapter_base: str | None,
                       served_name: str | None) -> str | None:
    """The warning for an adapter whose base_model_name_or_path is not the served model's
    name; None when they agree or either is unknown. Names agree when their last path
    components do, case-insensitively: 'meta-llama/Llama-2-7b-hf' and '/models/llama-2-7b-hf'."""
    if not adapter_base or not served_name or \
            _normalize_name(adapter_base) == _normalize_name(served_name):
        return None
    return (f"adapter {adapter_id!r} names base model {adapter_base!r}, not {served_name!r} "
            "(the model this server serves); it is served because its tensor shapes fit")


def check_base_model(adapter: AdapterSpec, expected_name: str | None,
                     strict: bool = False) -> str | None:
    """base_model_warning for this adapter; with `strict`, an AdapterBaseModelMismatch
    instead, also when the adapter names no base model.

    PEFT writes whatever the trainer passed (often a local folder), so a name that differs
    proves nothing: the tensor shapes, checked when the adapter is read, are what refuse an
    adapter of another base. The name refuses only when the operator asks
    (--strict-base-model)."""
    warning = base_model_warning(adapter.adapter_id, adapter.base_model_name, expected_name)
    if not strict or not expected_name:
        return warning
    config_file = os.path.join(adapter.path, CONFIG_FILE)
    if not adapter.base_model_name:
        raise AdapterBaseModelMismatch(
            adapter.adapter_id, config_file, "names no base_model_name_or_path; this server "
            f"checks it strictly (--strict-base-model) and serves {expected_name!r}")
    if warning is not None:
        raise AdapterBaseModelMismatch(
            adapter.adapter_id, config_file,
            f"trained on base model {adapter.base_model_name!r}; this server serves "
            f"{expected_name!r} and checks the name strictly (--strict-base-model)")
    return None
