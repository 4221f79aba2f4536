"""Configs, one dataclass per concern, validated when built.

Everything else in slora imports these; this module imports nothing of ours but errors.
`EngineConfig.check()` holds the checks that span configs (adapter rank against the pool,
context length against the pool).
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

from slora.common.errors import ConfigError

STANDARD_LORA_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
"""The projections of a Llama-style decoder layer, by their PEFT names. A family (models/)
declares which of them its adapters may target; ModelConfig.lora_modules carries that."""

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and features of a base model, whatever its family (models/ builds it from the
    family's config.json and builds the family's layers from it). Family-neutral: the
    scheduler, the frontend and adapter_store read the shapes, the pages and the LoRA targets
    from here without knowing any family."""

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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"
    model_type: str = "llama"
    """The family (config.json's model_type): llama, mistral, qwen2 or qwen3."""
    lora_modules: tuple[str, ...] = STANDARD_LORA_MODULES
    """The projections an adapter may target, as the family declares them, in the order
    their pages are laid out (and their index in the pool's LoRA tables)."""
    qkv_bias: bool = False
    """q, k and v projections carry a bias (Qwen2)."""
    qk_norm: bool = False
    """Each q and k head is RMS-normalised before the rotary embedding (Qwen3)."""
    sliding_window: int = 0
    """Each token attends to the last `sliding_window` positions, itself included (Mistral);
    0: the whole context."""
    lora_rank_multiple: int = 1
    """Adapter ranks take pool pages in multiples of this: the tensor-parallel size of the
    worker group, whose column-parallel projections deal each module's rank-rows out evenly
    over the ranks (1 without tensor parallelism; EngineConfig sets it)."""

    def __post_init__(self):
        object.__setattr__(self, "lora_modules", tuple(self.lora_modules))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
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
        unknown = [m for m in self.lora_modules if m not in STANDARD_LORA_MODULES]
        if unknown or not self.lora_modules:
            raise ConfigError(f"model config: LoRA targets {list(self.lora_modules)}; each must "
                              f"be one of {list(STANDARD_LORA_MODULES)}")
        if self.lora_rank_multiple <= 0:
            raise ConfigError(f"model config: lora_rank_multiple must be positive, got "
                              f"{self.lora_rank_multiple}")
        if self.sliding_window < 0:
            raise ConfigError(f"model config: sliding_window must be >= 0 (0: none), got "
                              f"{self.sliding_window}")
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
        return max(self.lora_pages_per_row(m) for m in self.lora_modules)

    @property
    def lora_module_index(self) -> dict[str, int]:
        """Module -> its index in the pool's LoRA tables (lora_modules order)."""
        return {m: i for i, m in enumerate(self.lora_modules)}

    def padded_rank(self, rank: int) -> int:
        """The rank-rows a module of this rank takes in the pool: `rank` rounded up to a
        multiple of lora_rank_multiple."""
        return -(-rank // self.lora_rank_multiple) * self.lora_rank_multiple

    def adapter_num_pages(self, module_ranks: dict[str, int]) -> int:
        """Pages an adapter with these per-module ranks takes in the unified pool."""
        return sum(self.padded_rank(r) * self.lora_pages_per_row(m)
                   for m, r in module_ranks.items())

    def to_dict(self) -> dict:
        """Plain JSON types; `ModelConfig.from_dict` gives this config back exactly (it
        crosses processes in the worker's Info)."""
        d = dataclasses.asdict(self)
        d["lora_modules"], d["eos_token_ids"] = list(self.lora_modules), list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config: unknown fields {unknown}")
        return cls(**d)


@dataclass
class PoolConfig:
    """The unified pool: one page holds a token's K and V at every layer, or one rank-row of
    one adapter module at every layer."""

    num_pages: int
    """Pages in the pool (each [num_layers, 2, H] elements)."""
    max_adapter_slots: int | None = None
    """Deprecated cap on the adapters resident at once. None (the default): no cap, the
    pool's pages are the only bound, as S-LoRA's unified paging promises."""
    max_lora_rank: int = 64
    """Highest adapter rank the pool accepts."""

    def __post_init__(self):
        if self.num_pages <= 0:
            raise ConfigError(f"pool: num_pages must be positive, got {self.num_pages}")
        if self.max_adapter_slots is not None and self.max_adapter_slots <= 0:
            raise ConfigError(f"pool: max_adapter_slots must be positive (or None: no cap), "
                              f"got {self.max_adapter_slots}")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ConfigError(f"pool: max_lora_rank must be in [1, 1024], got {self.max_lora_rank}")

    @property
    def num_adapter_slots(self) -> int:
        """Adapters that can be resident at once, the length of the kernels' per-adapter
        tables: one per page, since every adapter takes at least one page (rank 1 on one
        projection), so the pool is the only bound; the deprecated max_adapter_slots when
        set. Sized once, so captured CUDA graphs never see the tables move."""
        if self.max_adapter_slots is None:
            return self.num_pages
        return min(self.max_adapter_slots, self.num_pages)


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


MAX_TENSOR_PARALLEL_SIZE = 64


@dataclass
class MemorySizing:
    """Asks a CUDA worker to size what its flags leave open from the device's memory, as
    measured when it starts (worker/memory_plan.py); the worker then writes its choice into
    the config and drops this."""

    gpu_memory_utilization: float = 0.9
    """Share of the GPU's total memory the worker may use: weights, pool, activations,
    CUDA graphs."""
    size_batch: bool = True
    """max_num_seqs from the pool too (False: as given)."""

    def __post_init__(self):
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")


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
    tensor_parallel_size: int = 1
    """Worker processes (one per GPU) that each hold a shard of the model and the pool."""
    memory_sizing: MemorySizing | None = None
    """Set: the worker sizes the pool (num_pages here is provisional) and, with size_batch,
    max_num_seqs from measured memory at start; None: as given."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} not in {DTYPES}")
        if not 1 <= self.tensor_parallel_size <= MAX_TENSOR_PARALLEL_SIZE:
            raise ConfigError(f"tensor_parallel_size must be in [1, {MAX_TENSOR_PARALLEL_SIZE}], "
                              f"got {self.tensor_parallel_size}")
        if self.model.lora_rank_multiple != self.tensor_parallel_size:
            self.model = dataclasses.replace(self.model,
                                             lora_rank_multiple=self.tensor_parallel_size)
        self.check()

    def check(self) -> None:
        """Checks across configs: one request with the largest adapter must always fit."""
        if self.scheduler.max_model_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.scheduler.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model.max_position_embeddings}")
        max_adapter_pages = self.model.adapter_num_pages(
            {m: self.pool.max_lora_rank for m in self.model.lora_modules})
        need = self.scheduler.max_model_len + max_adapter_pages
        if need > self.pool.num_pages:
            raise ConfigError(
                f"pool of {self.pool.num_pages} pages cannot hold one request of max_model_len "
                f"{self.scheduler.max_model_len} with an adapter of rank "
                f"{self.pool.max_lora_rank} on all modules ({max_adapter_pages} pages): "
                f"need {need}")
