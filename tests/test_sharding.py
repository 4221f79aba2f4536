"""Tensor-parallel sharding (models/sharding.py), pure: the Megatron cut of the base weights
and of LoRA A/B, checked by recomputing each projection from the ranks' shards as the
sharded forward does (column-parallel: concatenated outputs; row-parallel: summed partials;
LoRA: all-gather of x A^T for column-parallel, all-reduce for row-parallel), against the
unsharded maths. The communication count of the sharded forward is checked with real
collectives in test_tensor_parallel.py."""
from __future__ import annotations

import pytest
import torch

from slora.common.config import STANDARD_LORA_MODULES, ModelConfig
from slora.common.errors import ConfigError
from slora.models.sharding import (
    COLUMN_PARALLEL, gathered_lora_order, lora_collective_elements, shard_base_weight,
    shard_lora, shard_plan, shrink_rank, split_range,
)

SHAPES = {
    "mha": dict(num_heads=4, num_kv_heads=4, hidden_size=64, intermediate_size=160),
    "gqa": dict(num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=160),
    "mqa": dict(num_heads=8, num_kv_heads=1, hidden_size=128, intermediate_size=352),
    "smollm2": dict(num_heads=9, num_kv_heads=3, hidden_size=576, intermediate_size=1536),
    "llama-3-8b": dict(num_heads=32, num_kv_heads=8, hidden_size=4096, intermediate_size=14336),
}
CASES = [(shape, n) for shape in SHAPES for n in (1, 2, 4, 8)
         if not (shape == "smollm2" and n > 2) and not (shape in ("mha", "gqa") and n == 8)]


def model(shape: str) -> ModelConfig:
    return ModelConfig(vocab_size=32, num_layers=2, name=shape, **SHAPES[shape])


@pytest.mark.parametrize("n,size", [(10, 3), (3, 2), (4, 4), (7, 1)])
def test_split_range_tiles_the_items_in_order_larger_shares_first(n, size):
    ranges = [split_range(n, size, r) for r in range(size)]
    assert sum(count for _, count in ranges) == n
    assert [first for first, _ in ranges] == [0] + [f + c for f, c in ranges[:-1]]
    assert max(c for _, c in ranges) - min(c for _, c in ranges) <= 1
    assert [c for _, c in ranges] == sorted((c for _, c in ranges), reverse=True)


@pytest.mark.parametrize("shape,n", CASES)
def test_every_query_head_on_one_rank_reading_kv_heads_that_rank_holds(shape, n):
    """Query heads are split exactly once over the ranks; each rank's query heads read its
    own KV heads in groups of one size (what its attention assumes); KV heads are copied
    only when there are fewer of them than ranks."""
    cfg = model(shape)
    group = cfg.num_heads // cfg.num_kv_heads
    seen = []
    for rank in range(n):
        plan = shard_plan(cfg, rank, n)
        (q0, nq), (kv0, nkv) = plan.q_heads, plan.kv_heads
        seen += range(q0, q0 + nq)
        assert nq % nkv == 0
        local_group = nq // nkv
        for j, head in enumerate(range(q0, q0 + nq)):
            assert head // group == kv0 + j // local_group
        assert nkv == (1 if cfg.num_kv_heads < n else split_range(cfg.num_kv_heads, n, rank)[1])
    assert seen == list(range(cfg.num_heads))


def test_smollm2_over_two_ranks_splits_its_three_kv_groups_two_and_one():
    plans = [shard_plan(model("smollm2"), r, 2) for r in range(2)]
    assert [p.kv_heads for p in plans] == [(0, 2), (2, 1)]
    assert [p.q_heads for p in plans] == [(0, 6), (6, 3)]
    # Rank 0's q shard is 384 wide, so its pages are wider than 576 / 2.
    assert [p.page_width for p in plans] == [384, 288]


@pytest.mark.parametrize("shape,n", CASES)
def test_page_width_holds_the_rank_kv_and_every_module_row_shard(shape, n):
    cfg = model(shape)
    for rank in range(n):
        plan = shard_plan(cfg, rank, n)
        w = plan.page_width
        assert w % 8 == 0
        assert w * n >= cfg.hidden_size  # a column-parallel A row over N page halves
        assert plan.num_kv_heads * cfg.head_dim <= w
        for m in STANDARD_LORA_MODULES:
            pages = cfg.lora_pages_per_row(m)
            assert plan.width(m) <= pages * w, m
            if m not in COLUMN_PARALLEL:
                s = plan.in_slice(m)
                assert s.stop - s.start <= pages * w, m
        if n == 1:
            assert w == cfg.hidden_size


@pytest.mark.parametrize("cfg_kw,n,words", [
    (dict(num_heads=4, num_kv_heads=4), 8, ["8", "4 attention heads"]),
    (dict(num_heads=9, num_kv_heads=3), 4, ["4", "3 KV heads"]),
    (dict(num_heads=4, num_kv_heads=2), 8, ["8", "4 attention heads"]),
])
def test_models_that_cannot_be_cut_name_their_sizes(cfg_kw, n, words):
    cfg = ModelConfig(vocab_size=32, hidden_size=64 * cfg_kw["num_heads"] // 4,
                      intermediate_size=160, num_layers=1, **cfg_kw)
    with pytest.raises(ConfigError) as e:
        shard_plan(cfg, 0, n)
    for word in words:
        assert word in str(e.value)


def _weights(cfg: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {m: torch.randn(tuple(reversed(cfg.module_shape(m))), generator=gen,
                           dtype=torch.float64) for m in STANDARD_LORA_MODULES}


@pytest.mark.parametrize("shape,n", [c for c in CASES if c[0] != "llama-3-8b"])
def test_base_shards_recompute_each_projection(shape, n):
    """Column-parallel: the ranks' outputs, in rank order, are the full output's columns of
    their heads (KV heads copied where shared). Row-parallel: the partial sums over each
    rank's input columns add up to the full output."""
    cfg = model(shape)
    gen = torch.Generator().manual_seed(0)
    w = _weights(cfg, gen)
    x = torch.randn(5, cfg.hidden_size, generator=gen, dtype=torch.float64)
    plans = [shard_plan(cfg, r, n) for r in range(n)]
    for m in COLUMN_PARALLEL:
        full = x @ w[m].T
        for plan in plans:
            torch.testing.assert_close(x @ shard_base_weight(plan, m, w[m]).T,
                                       full[:, plan.out_slice(m)])
    for m, d_in in (("o_proj", cfg.q_dim), ("down_proj", cfg.intermediate_size)):
        xi = torch.randn(5, d_in, generator=gen, dtype=torch.float64)
        partial = sum(xi[:, p.in_slice(m)] @ shard_base_weight(p, m, w[m]).T for p in plans)
        torch.testing.assert_close(partial, xi @ w[m].T)


@pytest.mark.parametrize("rank_r", [1, 3, 8, 13])
@pytest.mark.parametrize("shape,n", [("gqa", 2), ("gqa", 4), ("smollm2", 2), ("mqa", 8)])
def test_lora_shards_recompute_the_delta_through_the_collectives(shape, n, rank_r):
    """For every module, the sharded LoRA (column-parallel: each rank's shrink over its rows
    of A, padded to R / N columns, all-gathered and put back in row order, then the expand of
    its B rows; row-parallel: partial shrinks summed, then each rank's slice of B) gives, on
    each rank, its columns of the unsharded x A^T B^T."""
    cfg = model(shape)
    gen = torch.Generator().manual_seed(rank_r)
    plans = [shard_plan(cfg, r, n) for r in range(n)]
    padded = -(-rank_r // n) * n
    for m in STANDARD_LORA_MODULES:
        d_in, d_out = cfg.module_shape(m)
        a = torch.randn(2, rank_r, d_in, generator=gen, dtype=torch.float64)
        b = torch.randn(2, d_out, rank_r, generator=gen, dtype=torch.float64)
        x = torch.randn(3, d_in, generator=gen, dtype=torch.float64)
        full = x @ a[1].T @ b[1].T
        shards = [shard_lora(p, m, a, b) for p in plans]
        if m in COLUMN_PARALLEL:
            parts = []
            for plan, (a_p, _) in zip(plans, shards):
                assert a_p.shape[1] == shrink_rank(plan, rank_r)
                v_p = torch.zeros(3, 1, padded // n, dtype=torch.float64)
                v_p[:, 0, :a_p.shape[1]] = x @ a_p[1].T
                parts.append(v_p)
            v = gathered_lora_order(torch.stack(parts), rank_r)[:, 0]
        else:
            v = sum(x[:, p.in_slice(m)] @ a_p[1].T for p, (a_p, _) in zip(plans, shards))
        torch.testing.assert_close(v, x @ a[1].T)
        for plan, (_, b_p) in zip(plans, shards):
            torch.testing.assert_close(v @ b_p[1].T, full[:, plan.out_slice(m)])


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("num_tokens,r", [(1, 8), (32, 16), (256, 64)])
def test_lora_collectives_on_attention_move_the_paper_count(n, num_tokens, r):
    """5 (N-1) B r / N on q, k, v, o (the paper, section 6); 9 (N-1) B r / N on all seven."""
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert lora_collective_elements(num_tokens, r, n, attention) == 5 * (n - 1) * num_tokens * r / n
    every = STANDARD_LORA_MODULES
    assert lora_collective_elements(num_tokens, r, n, every) == 9 * (n - 1) * num_tokens * r / n
    assert lora_collective_elements(num_tokens, r, 1, every) == 0
