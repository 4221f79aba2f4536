"""Tensor keys of a PEFT adapter file: every layout PEFT's own loaders apply, nothing else.

What PEFT 0.22 and transformers 5 load onto a Llama-family model (checked by loading each
layout with both and comparing the loaded weights), for one tensor, here q_proj's A at layer 0:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   PeftModel.save_pretrained
    model.layers.0.self_attn.q_proj.lora_A.weight                    transformers' save of a
                                                                     model with an adapter
    layers.0.self_attn.q_proj.lora_A.weight                          (transformers load_adapter
    base_model.model.layers.0.self_attn.q_proj.lora_A.weight          drops the `model.` prefix)
    ...q_proj.lora_A.default.weight                                  a PeftModel's state_dict,
    ...q_proj.lora_A.<name>.weight                                   with the adapter's name

PeftModel.from_pretrained applies keys with the whole `base_model.model.model.` prefix, with
or without the adapter name it loads under (`default` unless told); transformers' load_adapter
applies the first key and those without that prefix, with or without `.default.`
(tests/test_peft_compat.py loads each layout with the loader that applies it). We accept them
all: both loaders then compute the same W + scale * B A. One file holds one adapter: its keys
carry at most one adapter name, and no tensor twice. Any other key (a bias, a DoRA magnitude
vector, a full module or embedding copy, a typo) is refused by name: PEFT would skip it with a
warning, and the adapter served would not be the one trained.
VeLoRA's `lora_velora_embed` buffers only serve its training backward pass; they are skipped
when the config sets velora_config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

MODULE_PARENT: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
KEY_FORMAT = ("[base_model.model.][model.]layers.{i}.{self_attn|mlp}.{module}"
              ".lora_{A|B}[.{adapter name}].weight")
_KEY_RE = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)"
                     r"\.lora_([AB])(?:\.([A-Za-z0-9_-]+))?\.weight")
_VELORA_RE = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.\d+\.\w+\.\w+"
                        r"\.lora_velora_embed(?:\.[A-Za-z0-9_-]+)?")

# Keys that are a known PEFT feature we do not serve, and the field that made them.
_KNOWN_EXTRAS = (
    ("lora_magnitude_vector", "a DoRA magnitude vector (use_dora); DoRA adapters are not "
                              "supported"),
    ("lora_embedding_", "a LoRA embedding weight; only the q, k, v, o, gate, up, down "
                        "projections can be served"),
    ("modules_to_save", "a full copy of a base module (modules_to_save), which is not "
                        "supported"),
    ("trainable_tokens", "an embedding delta (trainable_token_indices), which is not "
                         "supported"),
)


def module_full_name(layer: int, module: str) -> str:
    """The module's name in LlamaForCausalLM.named_modules(), as PEFT matches it."""
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


def canonical_key(layer: int, module: str, which: str) -> str:
    """The key PeftModel.save_pretrained writes for this tensor."""
    return f"base_model.model.{module_full_name(layer, module)}.lora_{which}.weight"


@dataclass
class KeyLayout:
    """Parses a file's keys one by one, and checks what holds across them."""

    skip_velora: bool = False
    """velora_config is set: its training-only buffers are skipped."""
    adapter_name: str | None = None
    """The adapter name the keys carry (`.default.`), once one has."""
    key_of: dict[tuple[int, str, str], str] = field(default_factory=dict)
    """(layer, module, "A" | "B") -> the key that holds it."""

    def parse(self, key: str) -> tuple[int, str, str, str] | None:
        """(layer, parent, module, "A" | "B") of a LoRA weight key; None for a key to skip.
        Raises ValueError with the reason for any other key."""
        match = _KEY_RE.fullmatch(key)
        if match is None:
            if self.skip_velora and _VELORA_RE.fullmatch(key):
                return None
            for part, what in _KNOWN_EXTRAS:
                if part in key:
                    raise ValueError(f"tensor {key!r} is {what}")
            if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                raise ValueError(f"tensor {key!r} is a full embedding or output weight, which "
                                 "PEFT saves when the vocabulary was resized (or embeddings "
                                 "were trained); this server serves the base model's own")
            if key.endswith(".bias"):
                raise ValueError(f"tensor {key!r} is a bias (bias / lora_bias in the config); "
                                 "bias terms are not supported")
            raise ValueError(f"tensor key {key!r} does not parse; expected {KEY_FORMAT}")
        layer, parent, module, which, name = (int(match[1]), match[2], match[3], match[4],
                                              match[5])
        if MODULE_PARENT.get(module) != parent:
            raise ValueError(f"tensor key {key!r} does not parse: {parent}.{module} is not one "
                             "of the q, k, v, o (self_attn) or gate, up, down (mlp) projections")
        if name is not None:
            if self.adapter_name is not None and name != self.adapter_name:
                raise ValueError(f"tensor {key!r} belongs to adapter {name!r}, but the file "
                                 f"also holds adapter {self.adapter_name!r}; save one adapter "
                                 "per folder")
            self.adapter_name = name
        first = self.key_of.setdefault((layer, module, which), key)
        if first != key:
            raise ValueError(f"tensors {first!r} and {key!r} are the same weight "
                             f"({module} lora_{which} at layer {layer}) in two layouts")
        return layer, parent, module, which
