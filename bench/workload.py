"""The S-LoRA paper's synthetic workload, seeded, and its dummy adapters.

The trace is drawn the way the paper's benchmark code draws it (S-LoRA `benchmarks/trace.py`,
`generate_requests`), so that the same seed gives the same requests and our figures compare
with the paper's. One `numpy.random.RandomState(seed)` stream, consumed in this order:

1. the adapter of each request: X ~ Power(alpha) on [0, 1] (`power(alpha, n)`, density
   alpha * x^(alpha - 1): alpha = 1 is uniform popularity, a smaller alpha crowds the
   requests onto the low indices), index = floor(num_adapters * X);
2. the input lengths, `randint(lo, hi, n)`, then the output lengths, likewise (so the upper
   bound is exclusive, as in the paper's code: [8, 512) by default);
3. the gaps between arrivals, Gamma(shape = 1 / cv^2, scale = cv^2 / rate): one process of
   total rate `rate` (cv = 1 is Poisson); request i arrives at the sum of the first i+1 gaps.

The Zipf option replaces step 1 with a bounded Zipf, P(i) proportional to (i + 1)^-s, drawn by
inverting its CDF at one uniform per request. Power(alpha) also takes one uniform per request
(legacy numpy: `1 - exp(-E)` with E = -log(1 - U)), so both options leave steps 2 and 3, the
lengths and the arrival times, identical. Prompts are token ids (the paper sends "Hello " *
len); ours are drawn after step 3 and do not disturb it.

Adapters: adapter i has rank `ranks[i % len(ranks)]` (round-robin, as the paper names its
adapter folders `<dir>-<i>` for each dir in turn) and targets q, k, v, o (the modules the
paper's S-LoRA serves). Two ways to make them:

* straight into host memory (`DummyAdapterFactory`): a LoraAdapter of seeded random weights,
  built by the worker's host cache when the scheduler first loads it. Its path is a name,
  `dummy-adapter://r<rank>/s<seed>`, that `dummy_adapter_loader` recognises; the registry is
  given a record for it directly (`seed_registry`), so no file is written or read. Each
  adapter's tensors are a contiguous window of a per-(module, rank) bank of pinned random
  rows, the window picked by its seed: making one costs a slice, not a 16 MB randn, and host
  memory holds a few banks, not 2,000 adapters; the worker copies every adapter's rows to the
  GPU all the same.
* as real PEFT folders of the same weights (`write_peft_adapters`), uploaded through the
  API like a user's.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from slora.adapter_store import LoraAdapter, load_peft_adapter
from slora.adapter_store.peft import CONFIG_FILE, WEIGHTS_FILE, module_full_name
from slora.common.config import STANDARD_LORA_MODULES, ModelConfig
from slora.common.errors import ConfigError

DUMMY_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The modules the paper's S-LoRA applies LoRA to."""
DUMMY_PATH_PREFIX = "dummy-adapter://"
BANK_WINDOWS = 32
"""Distinct weight windows per (module, rank) bank: adapters whose seeds differ mod this
have different weights."""
MADE_FROM_FILE = ".slora-bench.json"
"""Beside a written PEFT folder's files: the seeds it was made from (to reuse it)."""
NO_ADAPTER = -1
"""Request.adapter_index of a request for the base model alone."""
POPULARITIES = ("power", "zipf")


@dataclass(frozen=True)
class Preset:
    """One of the paper's settings."""

    name: str
    model: str
    ranks: tuple[int, ...]
    """Adapter ranks, assigned round-robin."""


PRESETS: dict[str, Preset] = {
    "S1": Preset("S1", "dummy-llama-7b", (8,)),
    "S2": Preset("S2", "dummy-llama-7b", (64, 32, 16, 8)),
}


@dataclass(frozen=True)
class WorkloadConfig:
    num_adapters: int
    num_requests: int
    rate: float
    """Total arrival rate, requests/s (math.inf: every request at t = 0)."""
    cv: float = 1.0
    """Coefficient of variation of the gaps between arrivals (1: Poisson)."""
    alpha: float = 1.0
    """Power-law exponent of adapter popularity (1: uniform)."""
    popularity: str = "power"
    """"power" (the paper's) or "zipf"."""
    zipf_s: float = 1.1
    """Zipf exponent, with popularity="zipf"."""
    input_range: tuple[int, int] = (8, 512)
    """Prompt lengths, tokens, lower bound inclusive, upper exclusive (the paper's randint)."""
    output_range: tuple[int, int] = (8, 512)
    """Output lengths (max_new_tokens with ignore_eos), tokens, likewise."""
    seed: int = 42
    """The paper's default."""

    def __post_init__(self):
        if self.num_adapters < 1:
            raise ConfigError(f"workload: num_adapters must be >= 1, got {self.num_adapters}")
        if self.num_requests < 1:
            raise ConfigError(f"workload: num_requests must be >= 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ConfigError(f"workload: rate must be > 0 requests/s, got {self.rate}")
        if not self.cv > 0:
            raise ConfigError(f"workload: cv must be > 0, got {self.cv}")
        if not self.alpha > 0:
            raise ConfigError(f"workload: alpha must be > 0, got {self.alpha}")
        if self.popularity not in POPULARITIES:
            raise ConfigError(f"workload: popularity {self.popularity!r} not in {POPULARITIES}")
        if not self.zipf_s > 0:
            raise ConfigError(f"workload: zipf_s must be > 0, got {self.zipf_s}")
        for name in ("input_range", "output_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo < hi:
                raise ConfigError(f"workload: {name} [{lo}, {hi}) must have 1 <= lo < hi")

    @property
    def max_context_len(self) -> int:
        """The longest prompt + output a request of this workload can have."""
        return self.input_range[1] - 1 + self.output_range[1] - 1


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float
    """Seconds after the start of the run."""
    adapter_index: int
    """Index into the adapter list, or NO_ADAPTER."""
    prompt_token_ids: tuple[int, ...]
    output_len: int


def adapter_popularity(cfg: WorkloadConfig) -> np.ndarray:
    """P(adapter i) under the workload's popularity, [num_adapters]."""
    n = cfg.num_adapters
    if cfg.popularity == "zipf":
        w = (np.arange(n) + 1.0) ** -cfg.zipf_s
        return w / w.sum()
    # X ~ Power(alpha): P(X < x) = x^alpha, so P(floor(n X) = i) = ((i+1)/n)^a - (i/n)^a.
    edges = (np.arange(n + 1) / n) ** cfg.alpha
    return np.diff(edges)


def generate_requests(cfg: WorkloadConfig, vocab_size: int) -> list[Request]:
    """The workload's requests in arrival order (see the module docstring for the draws)."""
    rng = np.random.RandomState(cfg.seed)
    n = cfg.num_requests
    if cfg.popularity == "power":
        x = rng.power(cfg.alpha, n)
        adapter_idx = (x * cfg.num_adapters).astype(np.int64)
    else:
        cdf = np.cumsum(adapter_popularity(cfg))
        adapter_idx = np.searchsorted(cdf, rng.random_sample(n) * cdf[-1], side="right")
    adapter_idx = np.minimum(adapter_idx, cfg.num_adapters - 1)  # x == 1.0 has measure zero
    input_lens = rng.randint(cfg.input_range[0], cfg.input_range[1], n)
    output_lens = rng.randint(cfg.output_range[0], cfg.output_range[1], n)
    if math.isinf(cfg.rate):
        arrivals = np.zeros(n)
    else:
        shape, scale = 1.0 / (cfg.cv * cfg.cv), cfg.cv * cfg.cv / cfg.rate
        arrivals = np.cumsum(rng.gamma(shape, scale, n))
    # Token ids 3.. (0-2 are pad, bos, eos in our dummy models); after the paper's draws.
    prompts_rng = np.random.RandomState(cfg.seed + 1)
    return [
        Request(i, float(arrivals[i]), int(adapter_idx[i]),
                tuple(int(t) for t in prompts_rng.randint(3, vocab_size, int(input_lens[i]))),
                int(output_lens[i]))
        for i in range(n)
    ]


# -- adapters ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DummyAdapter:
    """One adapter of a preset: its id, rank and the seed of its weights."""

    adapter_id: str
    rank: int
    seed: int

    @property
    def path(self) -> str:
        """The name the host-memory loader makes it from (no file behind it)."""
        return f"{DUMMY_PATH_PREFIX}r{self.rank}/s{self.seed}"

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank  # scale 2, as adapter_store/demo.py's adapters have

    def module_ranks(self) -> dict[str, int]:
        return {m: self.rank for m in DUMMY_TARGETS}


def preset_adapters(preset: Preset, num_adapters: int, seed: int = 0) -> list[DummyAdapter]:
    """`<preset>-<i>` for i < num_adapters, ranks round-robin; a larger count extends a
    smaller one (the first 5 of 2,000 are the 5)."""
    prefix = preset.name.lower()
    return [DummyAdapter(f"{prefix}-{i}", preset.ranks[i % len(preset.ranks)],
                         seed * 1_000_003 + i) for i in range(num_adapters)]


def parse_dummy_path(path: str) -> tuple[int, int] | None:
    """(rank, seed) of a `dummy-adapter://r<rank>/s<seed>` path; None for any other path."""
    if not path.startswith(DUMMY_PATH_PREFIX):
        return None
    try:
        r, s = path[len(DUMMY_PATH_PREFIX):].split("/")
        if r[0] != "r" or s[0] != "s":
            raise ValueError
        return int(r[1:]), int(s[1:])
    except (ValueError, IndexError):
        raise ConfigError(f"dummy adapter path {path!r} is not "
                          f"{DUMMY_PATH_PREFIX}r<rank>/s<seed>") from None


class DummyAdapterFactory:
    """LoraAdapters of seeded random weights, made in host memory (pinned on CUDA machines).

    Per (module, rank), one bank of A rows [num_layers + BANK_WINDOWS, r, d_in] and B rows
    [num_layers + BANK_WINDOWS, d_out, r]; an adapter of seed s takes the num_layers
    consecutive layers from window s % BANK_WINDOWS: contiguous views, so the worker copies
    them to the GPU as it copies a parsed PEFT adapter.
    """

    def __init__(self, model: ModelConfig, dtype: torch.dtype, pin_memory: bool,
                 seed: int = 0):
        self.model, self.dtype, self.seed = model, dtype, seed
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._banks: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def bank(self, module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (module, rank)
        if key not in self._banks:
            d_in, d_out = self.model.module_shape(module)
            num = self.model.num_layers + BANK_WINDOWS
            gen = torch.Generator().manual_seed(
                self.seed * 7919 + STANDARD_LORA_MODULES.index(module) * 1031 + rank)
            a = torch.randn(num, rank, d_in, generator=gen) / math.sqrt(d_in)
            b = torch.randn(num, d_out, rank, generator=gen) * 0.01
            a, b = a.to(self.dtype), b.to(self.dtype)
            if self.pin_memory:
                a, b = a.pin_memory(), b.pin_memory()
            self._banks[key] = (a, b)
        return self._banks[key]

    def prepare(self, ranks) -> None:
        """Make the banks of these ranks now (a second or two for rank 64 on Llama-7B), so
        the first adapter of each rank does not pay for it inside a step."""
        for rank in sorted(set(ranks)):
            for m in DUMMY_TARGETS:
                self.bank(m, rank)

    def make(self, adapter_id: str, path: str, rank: int, seed: int) -> LoraAdapter:
        num_layers, window = self.model.num_layers, seed % BANK_WINDOWS
        adapter = DummyAdapter(adapter_id, rank, seed)
        scale = adapter.lora_alpha / rank
        weights = {}
        for m in DUMMY_TARGETS:
            a, b = self.bank(m, rank)
            weights[m] = (a[window:window + num_layers], b[window:window + num_layers])
        return LoraAdapter(
            adapter_id=adapter_id, path=path, base_model_name=self.model.name,
            module_ranks=adapter.module_ranks(), module_scales={m: scale for m in DUMMY_TARGETS},
            rank=rank, lora_alpha=adapter.lora_alpha, use_rslora=False,
            layer_ranks={m: (rank,) * num_layers for m in DUMMY_TARGETS},
            layer_scales={m: (scale,) * num_layers for m in DUMMY_TARGETS}, weights=weights)


def dummy_adapter_loader(factory: DummyAdapterFactory, max_rank: int, pin_memory: bool):
    """A HostAdapterCache loader: `dummy-adapter://` paths are made by `factory`, any other
    path is read as a PEFT folder (what the worker's own loader does)."""
    model, dtype = factory.model, factory.dtype

    def load(adapter_id: str, path: str) -> LoraAdapter:
        parsed = parse_dummy_path(path)
        if parsed is None:
            return load_peft_adapter(adapter_id, path, model, max_rank, dtype, pin_memory)
        rank, seed = parsed
        if rank > max_rank:
            raise ConfigError(f"dummy adapter {adapter_id!r} has rank {rank}; this pool "
                              f"allows {max_rank}")
        return factory.make(adapter_id, path, rank, seed)

    return load


def adapter_bytes(model: ModelConfig, rank: int, dtype_size: int) -> int:
    """Bytes of one dummy adapter's weights (A and B of each target, every layer)."""
    return dtype_size * model.num_layers * sum(
        rank * sum(model.module_shape(m)) for m in DUMMY_TARGETS)


def seed_registry(redis_url: str, model: ModelConfig, adapters: list[DummyAdapter],
                  dtype_size: int) -> None:
    """Writes the adapters' records straight into the registry's Redis, as a registration
    through the API would (adapter_store/registry.py's schema), with their dummy paths: the
    host-memory mode, where no PEFT folder exists to register."""
    import redis

    from slora.adapter_store.registry import (
        IDS_KEY, STATE_READY, AdapterRecord, adapter_key, blob_key, owner_key,
    )

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    now = time.time()
    try:
        for start in range(0, len(adapters), 512):
            with client.pipeline(transaction=False) as pipe:
                for a in adapters[start:start + 512]:
                    sha = hashlib.sha256(a.path.encode()).hexdigest()
                    record = AdapterRecord(
                        adapter_id=a.adapter_id, owner="", rank=a.rank, lora_alpha=a.lora_alpha,
                        use_rslora=False, target_modules=DUMMY_TARGETS,
                        module_ranks=a.module_ranks(), base_model=model.name, path=a.path,
                        sha256=sha, size_bytes=adapter_bytes(model, a.rank, dtype_size),
                        created_unix=now, num_pages=model.adapter_num_pages(a.module_ranks()))
                    fields = dict(record.to_hash(), state=STATE_READY,
                                  request_id=f"bench-{a.adapter_id}")
                    pipe.hset(adapter_key(a.adapter_id), mapping=fields)
                    pipe.sadd(IDS_KEY, a.adapter_id)
                    pipe.sadd(owner_key(""), a.adapter_id)
                    pipe.sadd(blob_key(sha), a.adapter_id)
                pipe.execute()
    finally:
        client.close()


def write_peft_adapters(root: str, factory: DummyAdapterFactory,
                        adapters: list[DummyAdapter]) -> dict[str, str]:
    """Each adapter as a real PEFT folder under `root` (adapter_config.json and
    adapter_model.safetensors, named as PEFT saves them), holding the very weights the
    host-memory mode makes from its seed; a folder already written for the same rank and seed
    is kept. Returns adapter id -> folder."""
    from safetensors.torch import save_file

    model = factory.model
    paths = {}
    for a in adapters:
        folder = os.path.join(root, a.adapter_id)
        paths[a.adapter_id] = folder
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": a.rank,
            "lora_alpha": a.lora_alpha, "target_modules": list(DUMMY_TARGETS),
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "base_model_name_or_path": model.name,
        }
        made_from = {"seed": a.seed, "dtype": str(factory.dtype), "bank_seed": factory.seed}
        stamp = os.path.join(folder, MADE_FROM_FILE)
        try:
            with open(stamp) as f:
                if json.load(f) == made_from:
                    continue
        except (OSError, ValueError):
            pass
        lora = factory.make(a.adapter_id, a.path, a.rank, a.seed)
        tensors = {}
        for m, (w_a, w_b) in lora.weights.items():
            for i in range(model.num_layers):
                prefix = f"base_model.model.{module_full_name(i, m)}"
                tensors[f"{prefix}.lora_A.weight"] = w_a[i].contiguous()
                tensors[f"{prefix}.lora_B.weight"] = w_b[i].contiguous()
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)
        with open(stamp, "w") as f:  # last: marks the folder complete
            json.dump(made_from, f)
    return paths


@dataclass
class Workload:
    """One setting's requests, and the adapters (by id) its requests name."""

    name: str
    config: WorkloadConfig
    requests: list[Request]
    adapters: list[DummyAdapter] = field(default_factory=list)
    """Empty for the base model alone."""

    def adapter_id(self, req: Request) -> str | None:
        if not self.adapters or req.adapter_index == NO_ADAPTER:
            return None
        return self.adapters[req.adapter_index].adapter_id

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)
