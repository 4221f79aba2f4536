"""Configs, one dataclass per concern, validated when built.

Everything else in slora imports these; this module imports nothing of ours but errors.
`EngineConfig.check()` holds the checks that span configs (adapter rank against the pool,
context length against the pool).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from slora.common.errors import ConfigError

# The projections a LoRA adapter may target, in the order their pages are laid out.
LORA_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
LORA_MODULE_INDEX: dict[str, int] = {name: i for i, name in enumerate(LORA_MODULES)}

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-architecture base model (Llama-2, Llama-3, Mistral, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    """H: the width of the residual stream, and of each half of a pool page."""
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    """0 means hidden_size // num_heads."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """Llama-3 style {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}, or None."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    """Mistral's attention window, in tokens (each token sees itself and the window - 1
    before it); None: every token sees the whole context."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim {self.head_dim} must be even for rotary")
        if self.kv_dim > self.hidden_size:
            raise ConfigError(
                f"model config: K/V width {self.kv_dim} exceeds hidden size {self.hidden_size}; "
                "a pool page half cannot hold one token's K")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") not in (
                "default", "llama3"):
            raise ConfigError(
                f"model config: rope_scaling type {self.rope_scaling.get('rope_type')!r} is not "
                "supported (default, llama3)")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection, as nn.Linear has them."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    def lora_pages_per_row(self, module: str) -> int:
        """Pages one rank-row of a module's adapter takes: A's row in the K halves, B's
        column in the V halves, each spanning ceil(len / H) pages."""
        return math.ceil(max(self.module_shape(module)) / self.hidden_size)

    @property
    def max_lora_pages_per_row(self) -> int:
        return max(self.lora_pages_per_row(m) for m in LORA_MODULES)

    def adapter_num_pages(self, module_ranks: dict[str, int]) -> int:
        """Pages an adapter with these per-module ranks takes in the unified pool."""
        return sum(r * self.lora_pages_per_row(m) for m, r in module_ranks.items())

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "llama") -> "ModelConfig":
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "mistral"):
            raise ConfigError(f"model config: model_type {arch!r} is not a Llama-family model")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("model config: attention_bias / mlp_bias are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"model config: hidden_act {d.get('hidden_act')!r} (need silu)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None
        if rope_type != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            rope_scaling["rope_type"] = rope_type
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=d.get("sliding_window") if arch == "mistral" else None,
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids, name=name,
        )

    @classmethod
    def from_folder(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"model folder {path!r} has no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, name=os.path.basename(os.path.normpath(path)))


# Real model shapes with seeded random weights, for benchmarks (as the paper's own are).
DUMMY_MODELS: dict[str, dict] = {
    "dummy-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                       num_heads=4, num_kv_heads=2, max_position_embeddings=2048),
    "dummy-llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_layers=32, num_heads=32, num_kv_heads=32),
    "dummy-llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                            num_layers=40, num_heads=40, num_kv_heads=40),
    "dummy-llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                             max_position_embeddings=8192),
}


def refuse_sliding_window_shorter_than_context(model: ModelConfig, max_model_len: int) -> None:
    """Attention here sees the whole context, so a Mistral whose sliding window is shorter
    than the longest context served would be served wrong past the window: refused, until
    attention honours the window."""
    window = model.sliding_window
    if window is not None and window < max_model_len:
        raise ConfigError(
            f"model config: sliding_window {window} is shorter than max_model_len "
            f"{max_model_len}; this server does not apply sliding-window attention yet, so "
            f"serve this model with max_model_len {window} or less")


def dummy_model_config(name: str) -> ModelConfig:
    if name not in DUMMY_MODELS:
        raise ConfigError(f"unknown dummy model {name!r}; known: {', '.join(DUMMY_MODELS)}")
    return ModelConfig(name=name, eos_token_ids=(2,), bos_token_id=1, **DUMMY_MODELS[name])


@dataclass
class PoolConfig:
    """The unified pool: one page holds a token's K and V at every layer, or one rank-row of
    one adapter module at every layer."""

    num_pages: int
    """Pages in the pool (each [num_layers, 2, H] elements)."""
    max_adapter_slots: int = 64
    """Adapters resident in the pool at once."""
    max_lora_rank: int = 64
    """Highest adapter rank the pool accepts."""

    def __post_init__(self):
        if self.num_pages <= 0:
            raise ConfigError(f"pool: num_pages must be positive, got {self.num_pages}")
        if self.max_adapter_slots <= 0:
            raise ConfigError(f"pool: max_adapter_slots must be positive, got "
                              f"{self.max_adapter_slots}")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ConfigError(f"pool: max_lora_rank must be in [1, 1024], got {self.max_lora_rank}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Requests running at once (the largest decode batch)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decode tokens plus prefill chunks."""
    max_model_len: int = 2048
    """Longest context (prompt + output tokens) of one request."""
    max_queue_len: int = 1024
    """Requests waiting to be admitted; past it, submit is refused."""

    def __post_init__(self):
        for f in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_queue_len"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"scheduler: {f} must be positive, got {getattr(self, f)}")


@dataclass
class EngineConfig:
    model: ModelConfig
    pool: PoolConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: str = "float32"
    device: str = "cpu"
    host_cache_bytes: int = 4 << 30
    """Parsed adapters kept in host memory, least recently used out first."""
    seed: int = 0
    """Seed of dummy weights."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} not in {DTYPES}")
        self.check()

    def check(self) -> None:
        """Checks across configs: one request with the largest adapter must always fit."""
        refuse_sliding_window_shorter_than_context(self.model, self.scheduler.max_model_len)
        if self.scheduler.max_model_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.scheduler.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model.max_position_embeddings}")
        max_adapter_pages = self.model.adapter_num_pages(
            {m: self.pool.max_lora_rank for m in LORA_MODULES})
        need = self.scheduler.max_model_len + max_adapter_pages
        if need > self.pool.num_pages:
            raise ConfigError(
                f"pool of {self.pool.num_pages} pages cannot hold one request of max_model_len "
                f"{self.scheduler.max_model_len} with an adapter of rank "
                f"{self.pool.max_lora_rank} on all modules ({max_adapter_pages} pages): "
                f"need {need}")
