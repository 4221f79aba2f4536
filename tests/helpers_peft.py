"""Tiny base models (Llama, Mistral, Qwen2, Qwen3) and PEFT LoRA adapters made locally, for tests (no hub downloads).

Import from a test as `from helpers_peft import make_tiny_llama, make_peft_adapter` (pytest puts
tests/ on sys.path). Both write Hugging Face folders that slora loads the way it loads real
ones: config.json + model.safetensors, adapter_config.json + adapter_model.safetensors.
edit_adapter_config changes fields of a saved adapter's config.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import torch

TINY_LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
"""The tiny base: H=64, intermediate 160, 2 layers, 4 heads of head_dim 16, vocab 256."""


FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
"""transformers' own config and model class of each family slora serves."""


def make_tiny_model(path: str, family: str = "llama", *, num_kv_heads: int = 4, seed: int = 0,
                    reinit=None, **overrides) -> str:
    """Save a seeded random float32 model of `family` (transformers' own config class with
    TINY_LLAMA's fields, updated by `overrides` in that class's field names) to `path` with
    save_pretrained (safetensors); returns `path`. Outside Llama, biases (Qwen2's q, k, v)
    and norm weights are randomised too: transformers makes them zeros and ones, which would
    hide a bias or a norm weight read from the wrong place. `reinit(model)`, when given,
    sets the weights last (under the same seed)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    fields = dict(TINY_LLAMA, num_key_value_heads=num_kv_heads, **overrides)
    config = config_cls(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
        if family != "llama":
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("bias"):
                        param.normal_(0.0, 0.1)
                    elif name.endswith("norm.weight"):
                        param.uniform_(0.5, 1.5)
        if reinit is not None:
            with torch.no_grad():
                reinit(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def make_tiny_llama(path: str, *, num_kv_heads: int = 4, seed: int = 0, **overrides) -> str:
    """Save a seeded random float32 `LlamaForCausalLM` (TINY_LLAMA updated by `overrides`,
    LlamaConfig field names) to `path` with save_pretrained (safetensors); returns `path`."""
    return make_tiny_model(path, "llama", num_kv_heads=num_kv_heads, seed=seed, **overrides)


def _load_base(base_model_or_path):
    """A fresh base model that get_peft_model may modify in place (it injects LoRA layers)."""
    if isinstance(base_model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(os.fspath(base_model_or_path),
                                                    dtype=torch.float32)
    return copy.deepcopy(base_model_or_path)


def make_peft_adapter(base_model_or_path, out_dir: str, *, r: int = 8,
                      target_modules: list[str] | str = ("q_proj", "v_proj"),
                      lora_alpha: float = 16, use_rslora: bool = False, seed: int = 0,
                      init_scale: float = 0.1, **lora_kwargs) -> str:
    """Make a PEFT LoRA adapter of the base with every lora_A and lora_B set to
    `init_scale * randn` from a generator seeded with `seed`, and save_pretrained it
    (safetensors) to `out_dir`; returns `out_dir`.

    PEFT initialises lora_B to zero, which would make any adapter a no-op and hide bugs, hence
    the randomisation. `lora_kwargs` go to peft.LoraConfig (layers_to_transform, rank_pattern,
    alpha_pattern, exclude_modules, ...). A list `target_modules` is saved as given; a str is
    a regex PEFT full-matches against module names like `model.layers.0.self_attn.q_proj`.
    """
    from peft import LoraConfig, get_peft_model

    model = _load_base(base_model_or_path)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    lora_kwargs = {"lora_dropout": 0.0, "bias": "none", **lora_kwargs}
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                        use_rslora=use_rslora, task_type="CAUSAL_LM", **lora_kwargs)
    with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(init_scale * torch.randn(param.shape, generator=gen))
    os.makedirs(out_dir, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    return out_dir


def edit_adapter_config(path: str, **fields) -> str:
    """Set fields of the adapter_config.json in the PEFT folder `path`; returns `path`."""
    cfg_file = os.path.join(path, "adapter_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg.update(fields)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    return path


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] not in ('system', 'user') %}"
    "{{ raise_exception('the first message must be system or user') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""ChatML, as SmolLM2's template writes it, with the role check many templates make."""
CHAT_TOKENIZER_VOCAB = 300
"""Byte-level BPE: 256 bytes, 3 special tokens, merges up to 300 (fits TINY_LLAMA with
vocab_size=320)."""


def add_chat_tokenizer(model_dir: str, texts: list[str]) -> str:
    """Write a byte-level BPE trained here on `texts` (no download) as tokenizer.json, and
    tokenizer_config.json with CHAT_TEMPLATE, into the model folder; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CHAT_TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 10, trainer)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>",
                   "bos_token": None, "add_bos_token": False,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return model_dir
