"""The fields of adapter_config.json: each is served exactly, has no effect at inference, or
refuses the adapter by name. docs/ADAPTERS.md has the same table for users.

Served is y = W x + scale * B A x on the base model's own W, with scale = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora) after rank_pattern / alpha_pattern. A field is refused
when honouring it would need anything else: other weights (DoRA's magnitude, biases, full
module copies), other modules (embeddings, raw parameters, replicated layers), another forward
pass (activated LoRA, QA-LoRA pooling, block-diagonal or routed LoRA), or another base: an
initialisation that changes W (PiSSA, OLoRA, CorDA, Astra, LoRA-GA, LoftQ) makes the adapter
right only on that changed W, which PEFT rebuilds from the base when it loads the adapter.
Such adapters are served once converted to plain LoRA (PEFT's
path_initial_model_for_weight_conversion), which gives the same model on the original base.

Fields this module does not know (a newer PEFT) are refused when set to anything but their
empty default, since they might change the maths.
"""
from __future__ import annotations

import math
import re

from slora.common.config import ModelConfig

RAISE_RANK_HINT = "the worker's --max-lora-rank raises it (`slora up --max-lora-rank N`)"
# Fields that never change the forward pass of a LoRA on nn.Linear modules at inference.
NO_EFFECT_FIELDS = (
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "runtime_config", "megatron_core", "qalora_group_size",
    "loftq_config", "eva_config", "corda_config", "astra_config", "lora_ga_config",
    "velora_config", "ensure_weight_tying",
)
"""lora_dropout is the identity at inference; the *_config of an initialisation only matter
while it initialises; VeLoRA only compresses what training keeps for the backward pass;
qalora_group_size and megatron_core only matter with use_qalora and megatron_config."""

SERVED_FIELDS = (
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "init_lora_weights", "bias", "fan_in_fan_out",
)
"""fan_in_fan_out: PEFT sets it back to false on nn.Linear modules (it is for GPT-2's
Conv1D), so the weights have the usual layout. bias: "none" only (see REFUSED_FIELDS)."""

REFUSED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
    "modules_to_save": "modules_to_save (full copies of base modules) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "trainable_token_indices": "trainable_token_indices (embedding deltas) is not supported",
    "layer_replication": "layer_replication (a base model with repeated layers) is not supported",
    "megatron_config": "megatron_config (LoRA on Megatron parallel layers) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}
"""Refused when set (truthy); their defaults (false, null, empty) are fine."""

INIT_SERVED = ("gaussian", "eva", "orthogonal", "mica", "nora")
"""String values of init_lora_weights (besides true and false) that leave W unchanged: the
saved A and B are the whole adapter."""
INIT_CONVERTIBLE = ("pissa", "olora", "corda", "astra", "lora_ga")
"""Initialisations that subtract scale * B0 A0 from W; PEFT converts them to plain LoRA.
`pissa_niter_N` is PiSSA with a fast SVD."""
CONVERT_HINT = ("convert it to a plain LoRA adapter with PEFT (peft_model.save_pretrained("
                "out_dir, path_initial_model_for_weight_conversion=<the adapter saved right "
                "after initialisation, with init_lora_weights=True>)) and register the "
                "converted folder")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_empty(value) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


def check_init(value) -> str | None:
    """Why init_lora_weights `value` cannot be served, or None."""
    if isinstance(value, bool) or value in INIT_SERVED:
        return None
    if isinstance(value, str):
        kind = value.lower()
        if kind in INIT_CONVERTIBLE or re.fullmatch(r"pissa(_niter_\d+)?", kind):
            return (f"init_lora_weights={value!r} changes the base weights (PEFT subtracts the "
                    "initial B0 A0 from W when it loads this adapter), so the adapter is right "
                    f"only on that changed base; {CONVERT_HINT}")
        if kind == "loftq":
            return ("init_lora_weights='loftq' adapters apply to the LoftQ-quantised base they "
                    "were trained with (PEFT replaces W by it), not to this server's base model")
    return (f"init_lora_weights {value!r} is not an initialisation this server knows (true, "
            f"false, {', '.join(INIT_SERVED + INIT_CONVERTIBLE)}, loftq)")


def check_fields(cfg: dict) -> str | None:
    """Why a field that changes the maths refuses this config, or None."""
    if cfg.get("peft_type") != "LORA":
        return f"peft_type {cfg.get('peft_type')!r} is not LORA"
    for name, reason in REFUSED_FIELDS.items():
        if not _is_empty(cfg.get(name)):
            return f"{reason} (found {name}={cfg[name]!r})"
    if cfg.get("bias", "none") != "none":
        return f"bias {cfg['bias']!r} is not supported (only 'none')"
    reason = check_init(cfg.get("init_lora_weights", True))
    if reason is not None:
        return reason
    known = set(NO_EFFECT_FIELDS) | set(SERVED_FIELDS) | set(REFUSED_FIELDS)
    for name, value in cfg.items():
        if name not in known and not _is_empty(value):
            kind = "a LoRA variant" if name.startswith("use_") else "a field"
            return (f"{name}={value!r} is {kind} this server does not know (it may change "
                    "the adapter's maths); see docs/ADAPTERS.md for the fields it serves")
    return None


def check_shape_fields(cfg: dict, model: ModelConfig, max_rank: int) -> str | None:
    """Why r, lora_alpha, the patterns, the targets or the layers are malformed, or None.
    May rewrite target_modules "all-linear" into the list PEFT expands it to."""
    r = cfg.get("r")
    if not _is_rank(r) or r <= 0:
        return f"r must be a positive integer, found {r!r}"
    if r > max_rank:
        return f"rank {r} exceeds this pool's max_lora_rank {max_rank}; {RAISE_RANK_HINT}"
    if not _is_number(cfg.get("lora_alpha")):
        return f"lora_alpha must be a finite number, found {cfg.get('lora_alpha')!r}"
    if not isinstance(cfg.get("use_rslora", False), bool):
        return f"use_rslora must be true or false, found {cfg['use_rslora']!r}"
    for name, ok, what in (("rank_pattern", _is_rank, "rank"),
                           ("alpha_pattern", _is_number, "alpha")):
        patterns = cfg.get(name) or {}
        if not isinstance(patterns, dict):
            return f"{name} must be an object, found {patterns!r}"
        for key, value in patterns.items():
            if not ok(value) or (what == "rank" and value <= 0):
                return f"{name} gives {key!r} an invalid {what} {value!r}"
            if what == "rank" and value > max_rank:
                return (f"{name} gives {key!r} rank {value}, which exceeds this pool's "
                        f"max_lora_rank {max_rank}; {RAISE_RANK_HINT}")
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        # PEFT: all Linear but lm_head
        targets = cfg["target_modules"] = list(model.lora_modules)
    elif not (isinstance(targets, str) or (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        return f"target_modules must be a non-empty list of names or a regex, found {targets!r}"
    exclude = cfg.get("exclude_modules")
    if not (exclude is None or isinstance(exclude, str) or (
            isinstance(exclude, list) and all(isinstance(e, str) for e in exclude))):
        return f"exclude_modules must be a list of names or a regex, found {exclude!r}"
    # Strings are regexes (lists are plain names); pattern dicts are keyed by regexes.
    layers_pattern = cfg.get("layers_pattern")
    if not (layers_pattern is None or isinstance(layers_pattern, str) or (
            isinstance(layers_pattern, list) and all(isinstance(p, str) for p in layers_pattern))):
        return f"layers_pattern must be a name or a list of names, found {layers_pattern!r}"
    regexes = [(n, cfg[n]) for n in ("target_modules", "exclude_modules")
               if isinstance(cfg.get(n), str)]
    regexes += [("layers_pattern", p) for p in
                ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or [])]
    regexes += [(n, k) for n in ("rank_pattern", "alpha_pattern") for k in cfg.get(n) or {}]
    for name, pattern in regexes:
        try:
            re.compile(pattern)
        except re.error as e:
            return f"{name} has {pattern!r}, not a valid regular expression ({e})"
    if isinstance(targets, str) and cfg.get("layers_to_transform") is not None:
        return "layers_to_transform cannot be used with a regex target_modules (PEFT refuses it)"
    layers = cfg.get("layers_to_transform")
    for layer in [layers] if _is_rank(layers) else (layers or []):
        if not _is_rank(layer) or not 0 <= layer < model.num_layers:
            return (f"layers_to_transform names layer {layer!r}; this model has layers "
                    f"0..{model.num_layers - 1}")
    return None
