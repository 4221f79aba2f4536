"""Tensor-parallel sharding: which slice of each base weight and of each LoRA adapter a rank
of the worker group holds (the Megatron cut, DESIGN.md "Tensor parallelism"). Pure functions
of tensors and the model's config; the worker applies them when it loads weights and when it
copies an adapter from the host cache, so each rank reads and copies only its shard.

Base model, weights as nn.Linear stores them ([out, in]):
* q, k, v, gate, up are column-parallel: a rank holds a slice of the outputs (rows). Heads go
  out in whole KV groups: with num_kv_heads >= N, each rank gets a contiguous run of KV heads
  and every query head that reads them; with fewer KV heads than ranks (N a multiple of
  num_kv_heads) a KV head is copied to N / num_kv_heads ranks, which split its query heads.
  Either way a rank's query heads read its KV heads in groups of one size, as attention needs.
  Counts that do not divide by N give the first ranks one more (SmolLM2's 3 KV heads over 2
  ranks: 2 and 1).
* o and down are row-parallel: a rank holds the input columns matching its heads / its slice
  of the intermediate size and computes a partial sum over them, all-reduced by the model.
* The embedding and lm_head are split over the vocabulary (models/embedding.py, which needs N
  to divide it): the embedding's rows are summed by an all-reduce of [tokens, hidden], the
  lm_head's logits all-gathered ([tokens, vocab / N] float32 from each rank).

LoRA follows the base's cut, so that its only collectives carry rank-r vectors:
* column-parallel module: A [r, d_in] is dealt out by rank-rows, row i to rank i % N (r rounded
  up to a multiple of N, ModelConfig.padded_rank); each rank computes its x @ A_p^T, one
  all-gather per projection group puts the full x @ A^T on every rank (interleaving the ranks'
  columns restores the row order), and B [d_out, r] is cut along its outputs like the weight.
* row-parallel module: A is cut along its input columns like the weight, the partial x @ A^T
  (r wide) is all-reduced, B is cut along its outputs (the rank's slice of the hidden size),
  and each rank adds that slice of the LoRA output into its partial sum before the base's
  all-reduce, which then carries both.
Per layer, each rank sends (N-1)/N * B * (g R + 2 a r) float32 values in the LoRA collectives,
for B tokens, the pool's max rank r (R: r rounded up to a multiple of N), g column-parallel and
a row-parallel modules with LoRA (a ring all-gather sends (N-1)/N of its output, a ring
all-reduce 2 (N-1)/N of its input): with LoRA on q, k, v, o and N | r, the paper's
5 (N-1) B r / N; on all seven, 9 (N-1) B r / N. The base's two all-reduces send
4 (N-1) B h / N (h the hidden size), in the model's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slora.common.config import STANDARD_LORA_MODULES, ModelConfig
from slora.common.errors import ConfigError

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
PAGE_WIDTH_MULTIPLE = 8
"""A rank's page halves hold a multiple of this many elements (16 bytes of bf16)."""


def split_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """(first, count) of rank's contiguous share of n items over `size` ranks; the first
    n % size ranks get one more."""
    base, extra = divmod(n, size)
    return rank * base + min(rank, extra), base + (rank < extra)


@dataclass(frozen=True)
class ShardPlan:
    """One rank's slices of the model."""

    rank: int
    size: int
    head_dim: int
    q_heads: tuple[int, int]
    """(first, count) of the query heads it holds."""
    kv_heads: tuple[int, int]
    """(first, count) of the KV heads they read."""
    intermediate: tuple[int, int]
    """(first, width) of its slice of the MLP's intermediate size."""
    hidden: tuple[int, int]
    """(first, width) of its slice of the hidden size: the row-parallel LoRA outputs."""
    page_width: int = 0
    """Elements in each half of one of its pool pages (see page_width)."""

    @property
    def num_heads(self) -> int:
        return self.q_heads[1]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1]

    def out_slice(self, module: str) -> slice:
        """The output rows of a column-parallel weight, or the output columns of a
        row-parallel module's LoRA B, that this rank holds."""
        hd = self.head_dim
        first, count = {
            "q_proj": (self.q_heads[0] * hd, self.q_heads[1] * hd),
            "k_proj": (self.kv_heads[0] * hd, self.kv_heads[1] * hd),
            "v_proj": (self.kv_heads[0] * hd, self.kv_heads[1] * hd),
            "gate_proj": self.intermediate, "up_proj": self.intermediate,
            "o_proj": self.hidden, "down_proj": self.hidden,
        }[module]
        return slice(first, first + count)

    def in_slice(self, module: str) -> slice:
        """The input columns of a row-parallel weight this rank holds."""
        first, count = {"o_proj": (self.q_heads[0] * self.head_dim,
                                   self.q_heads[1] * self.head_dim),
                        "down_proj": self.intermediate}[module]
        return slice(first, first + count)

    def width(self, module: str) -> int:
        """Columns of this rank's output of a column-parallel projection."""
        s = self.out_slice(module)
        return s.stop - s.start


def _heads(cfg: ModelConfig, rank: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    nh, nkv = cfg.num_heads, cfg.num_kv_heads
    group = nh // nkv
    if nkv >= size:
        kv = split_range(nkv, size, rank)
        return (kv[0] * group, kv[1] * group), kv
    copies = size // nkv  # ranks sharing one KV head
    kv_head = rank // copies
    first, count = split_range(group, copies, rank % copies)
    return (kv_head * group + first, count), (kv_head, 1)


def check_shardable(cfg: ModelConfig, size: int) -> None:
    """Raises ConfigError naming the model's sizes that cannot be cut over `size` ranks."""
    if size == 1:
        return
    if cfg.num_heads < size:
        raise ConfigError(f"tensor parallel size {size} exceeds the model's {cfg.num_heads} "
                          "attention heads: every rank needs at least one")
    if cfg.num_kv_heads < size and size % cfg.num_kv_heads:
        raise ConfigError(f"tensor parallel size {size} is not a multiple of the model's "
                          f"{cfg.num_kv_heads} KV heads (needed to copy each KV head to the "
                          "same number of ranks)")
    if cfg.num_kv_heads < size and cfg.num_heads // cfg.num_kv_heads < size // cfg.num_kv_heads:
        raise ConfigError(f"tensor parallel size {size}: each of the {cfg.num_kv_heads} KV "
                          f"heads has {cfg.num_heads // cfg.num_kv_heads} query heads, fewer "
                          f"than the {size // cfg.num_kv_heads} ranks it would be copied to")
    if cfg.vocab_size % size:
        raise ConfigError(f"tensor parallel size {size} does not divide the vocabulary of "
                          f"{cfg.vocab_size} tokens (the embedding and lm_head are split over it)")
    if min(cfg.hidden_size, cfg.intermediate_size) < size:
        raise ConfigError(f"tensor parallel size {size} exceeds the hidden size "
                          f"{cfg.hidden_size} or intermediate size {cfg.intermediate_size}")


def page_width(cfg: ModelConfig, plan: ShardPlan) -> int:
    """Elements per half of the rank's pool pages: room for its K/V heads of one token, and
    for its shard of one rank-row of every module in the ModelConfig.lora_pages_per_row
    pages that row has on every rank (a column-parallel A row of d_in = hidden elements
    spreads over the first pages of N rank-rows: hidden / N each); a multiple of
    PAGE_WIDTH_MULTIPLE, as the CUDA kernels read page halves 16 bytes at a time."""
    if plan.size == 1:
        return cfg.hidden_size
    widths = [math.ceil(cfg.hidden_size / plan.size), plan.num_kv_heads * cfg.head_dim]
    for m in STANDARD_LORA_MODULES:
        n = cfg.lora_pages_per_row(m)
        s = plan.out_slice(m)
        widths.append(math.ceil((s.stop - s.start) / n))
        if m in ROW_PARALLEL:
            s = plan.in_slice(m)
            widths.append(math.ceil((s.stop - s.start) / n))
    return -(-max(widths) // PAGE_WIDTH_MULTIPLE) * PAGE_WIDTH_MULTIPLE


def shard_plan(cfg: ModelConfig, rank: int, size: int) -> ShardPlan:
    """Rank `rank` of `size`'s slices of the model (ConfigError if it cannot be cut)."""
    check_shardable(cfg, size)
    q_heads, kv_heads = _heads(cfg, rank, size)
    plan = ShardPlan(rank, size, cfg.head_dim, q_heads, kv_heads,
                     split_range(cfg.intermediate_size, size, rank),
                     split_range(cfg.hidden_size, size, rank))
    return ShardPlan(**{**plan.__dict__, "page_width": page_width(cfg, plan)})


# -- base weights ---------------------------------------------------------------------------

def shard_base_weight(plan: ShardPlan, module: str, weight: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a projection's weight [out, in] (a view)."""
    if module in COLUMN_PARALLEL:
        return weight[plan.out_slice(module)]
    return weight[:, plan.in_slice(module)]


# -- LoRA -----------------------------------------------------------------------------------

def shrink_rank(plan: ShardPlan, rank: int) -> int:
    """Rank-rows of a column-parallel module of rank `rank` that this rank holds of A
    (rows plan.rank, plan.rank + N, ...)."""
    return len(range(plan.rank, rank, plan.size))


def shard_lora(plan: ShardPlan, module: str, a: torch.Tensor,
               b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B) of one module, stacked over layers as the host cache holds them:
    a [L, r, d_in], b [L, d_out, r]. Column-parallel: A's rows plan.rank::N [L, r_p, d_in],
    B's output rows [L, d_out_p, r]. Row-parallel: A's input columns [L, r, d_in_p], B's rows
    of the rank's hidden slice [L, hidden_p, r]. Views."""
    if module in COLUMN_PARALLEL:
        return a[:, plan.rank::plan.size], b[:, plan.out_slice(module)]
    return a[:, :, plan.in_slice(module)], b[:, plan.out_slice(module)]


def gathered_lora_order(v: torch.Tensor, max_rank: int) -> torch.Tensor:
    """The all-gathered shrink outputs of a projection group back in rank-row order:
    v [N, num_tokens, num_members, C] (C = padded max rank / N, column j of rank p being
    rank-row j * N + p) -> [num_tokens, num_members, max_rank]."""
    n, t, m, c = v.shape
    return v.permute(1, 2, 3, 0).reshape(t, m, c * n)[:, :, :max_rank]


def lora_collective_elements(num_tokens: int, max_rank: int, size: int, modules) -> int:
    """Float32 values one rank sends in the LoRA collectives of one layer, for a step of
    `num_tokens` tokens whose LoRA covers `modules`, in a pool of `max_rank` (see the module
    docstring)."""
    padded = -(-max_rank // size) * size
    g = sum(m in COLUMN_PARALLEL for m in modules)
    a = sum(m in ROW_PARALLEL for m in modules)
    return (size - 1) * num_tokens * padded * g // size + (
        2 * (size - 1) * num_tokens * max_rank // size) * a
