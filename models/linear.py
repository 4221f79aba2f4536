"""Parallel linear layers, each with the LoRA of the projections it computes.

Base and LoRA compute stay separate (never merged): `y = x W^T (+ b) + scale_i (x A_i^T)
B_i^T`, the first term one dense GEMM for the whole batch, the LoRA term the backend's
batched kernels over the adapters' pages, every token free to use its own adapter and rank.

A layer fuses the projections that share an input (q, k, v; gate, up) into one weight, so a
decoder layer is four GEMMs; their LoRA runs as one group (`LoraGroup`: for decode tokens one
kernel launch per group and layer), each member adding into its own columns of the output.

Sharding (models/parallel.py, models/sharding.py): a column-parallel layer holds its rank's
slice of each member's outputs; a row-parallel layer holds a slice of the inputs and ends with
one all-reduce. Each layer's `weight_loader` cuts its rank's shard out of a full checkpoint
tensor. The LoRA of a sharded layer (`_add_sharded_lora`) runs as its shrink, one collective
of the rank-r result and its expand: column-parallel, each rank's share of A's rank-rows, one
all-gather for the whole group, and B cut like the weight, so each member's LoRA output lands
in the rank's own columns; row-parallel, A cut along the inputs, an all-reduce of the partial
x A^T, and the rank's slice of B's outputs added into its partial sum before the layer's
all-reduce, which then carries both.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from slora.common.config import ModelConfig
from slora.common.errors import ConfigError
from slora.kernels.backend import LoraGroup
from slora.models.parallel import TensorParallel
from slora.models.sharding import gathered_lora_order


@dataclass(frozen=True)
class Member:
    """One projection of a fused layer: its PEFT name and where its shard sits."""

    module: str
    """PEFT name (q_proj, ...): what an adapter targets."""
    first_row: int
    """First output row of the member's full weight this rank holds."""
    num_rows: int
    """Rows (output features) this rank holds."""


class ParallelLinear(torch.nn.Module):
    """y = x W^T (+ b) for this rank's shard of W ([out_local, in_local]), plus the LoRA of
    each member the model's adapters may target. The step's pool, tables and batch come in
    `ctx` (models/decoder.py StepContext)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int, in_features: int,
                 members: list[Member], *, bias: bool = False):
        super().__init__()
        self.tp, self.layer, self.members = tp, layer, members
        out_features = sum(m.num_rows for m in members)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features),
                                         requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features), requires_grad=False)
                     if bias else None)
        self._lora_index = cfg.lora_module_index
        self.lora_groups: dict[frozenset[str], LoraGroup] = {}

    def make_lora_groups(self) -> None:
        """A LoraGroup for every non-empty subset of the members adapters may target (a step
        runs LoRA only for the modules its adapters target); made once on the weights'
        device, since a CUDA-graph capture cannot copy them there."""
        cols, col = {}, 0
        for m in self.members:
            if m.module in self._lora_index:
                cols[m.module] = (self._lora_index[m.module], col, m.num_rows)
            col += m.num_rows
        device = self.weight.device
        for n in range(1, len(cols) + 1):
            for subset in itertools.combinations(cols, n):
                members = tuple(cols[m] for m in subset)
                table = torch.tensor(members, dtype=torch.int32, device=device)
                self.lora_groups[frozenset(subset)] = LoraGroup(members, table)

    def member(self, shard_id: str | None) -> tuple[int, Member]:
        """(first output row in the fused weight, the member) of a checkpoint tensor."""
        row = 0
        for m in self.members:
            if shard_id is None or m.module == shard_id:
                return row, m
            row += m.num_rows
        raise KeyError(shard_id)

    def weight_loader(self, param: torch.nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | None) -> None:
        """Copies this rank's shard of a full checkpoint tensor (one member's, or the whole
        weight's when shard_id is None) into `param` (the weight, or the bias)."""
        row, m = self.member(shard_id)
        rows = loaded.narrow(0, m.first_row, m.num_rows)
        rows = self.cut_inputs(rows) if param is self.weight else rows
        target = param.data.narrow(0, row, m.num_rows)
        if tuple(rows.shape) != tuple(target.shape):
            raise ConfigError(f"shape {tuple(loaded.shape)} does not give this layer's shard "
                              f"{tuple(target.shape)}")
        target.copy_(rows)

    def cut_inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's columns (inputs) of a weight's rows: all of them, but row-parallel."""
        return rows

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight.T
        return torch.addmm(self.bias, x, self.weight.T)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, ctx) -> None:
        """y += each token's adapter's LoRA of the members, in place, each into its columns
        of y; launched right behind the GEMM that made y (see Backend.lora_group)."""
        lora = ctx.lora
        if not lora.any_lora:
            return
        modules = frozenset(m.module for m in self.members)
        if lora.modules is not None:
            modules &= lora.modules
        group = self.lora_groups.get(modules)
        if group is None:  # no member is a LoRA target of this family
            return
        pool = ctx.pool
        if self.tp.size > 1:
            self._add_sharded_lora(y, x, ctx, group)
            return
        ctx.backend.lora_group(y, x, pool.layer(self.layer), pool.lora_tables, group, lora,
                               after_base_gemm=True)

    def _add_sharded_lora(self, y: torch.Tensor, x: torch.Tensor, ctx, group: LoraGroup) -> None:
        """Column-parallel: each member's shrink through this rank's rows of A (the pool's
        lora_shrink_tables), one all-gather of the group's [tokens, members, R / N], put back
        in rank-row order, and each member's expand into its columns of y."""
        be, pool, lora = ctx.backend, ctx.pool, ctx.lora
        pages, tables = pool.layer(self.layer), pool.lora_tables
        parts = torch.stack([be.lora_shrink(x, pages, pool.lora_shrink_tables, m, lora)
                             for m, _, _ in group.members], dim=1)  # [tokens, members, R / N]
        v = gathered_lora_order(self.tp.gather(parts, "lora"), tables.max_rank)
        for k, (m, col, width) in enumerate(group.members):
            be.lora_expand(y[:, col:col + width], v[:, k].contiguous(), pages, tables, m, lora)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = self.gemm(x)
        self.add_lora(y, x, ctx)
        return y


class ColumnParallelLinear(ParallelLinear):
    """Projections of one input whose outputs are split across ranks (gate and up: each
    rank a slice of each)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int, in_features: int,
                 outputs: tuple[str, ...], *, bias: bool = False):
        plan = tp.plan(cfg)
        members = []
        for module in outputs:
            rows = plan.out_slice(module)
            members.append(Member(module, rows.start, rows.stop - rows.start))
        super().__init__(cfg, tp, layer, in_features, members, bias=bias)


class QKVParallelLinear(ParallelLinear):
    """q, k and v of one decoder layer: this rank's q heads, and its K/V heads (split, or
    copied when there are fewer KV heads than ranks)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int, *, bias: bool):
        plan = tp.plan(cfg)
        self.num_heads, self.num_kv_heads = plan.num_heads, plan.num_kv_heads
        members = []
        for module in ("q_proj", "k_proj", "v_proj"):
            rows = plan.out_slice(module)
            members.append(Member(module, rows.start, rows.stop - rows.start))
        super().__init__(cfg, tp, layer, cfg.hidden_size, members, bias=bias)


class RowParallelLinear(ParallelLinear):
    """One projection whose inputs are split across ranks (o, down): a partial sum per rank,
    its LoRA delta added before the all-reduce that completes both."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int, module: str,
                 out_features: int):
        plan = tp.plan(cfg)
        inputs = plan.in_slice(module)
        self.first_in, self.local_in = inputs.start, inputs.stop - inputs.start
        self.lora_outputs = plan.out_slice(module)
        """The columns of the partial sum this rank's slice of LoRA B adds into."""
        super().__init__(cfg, tp, layer, self.local_in, [Member(module, 0, out_features)])

    def cut_inputs(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.narrow(1, self.first_in, self.local_in)

    def _add_sharded_lora(self, y: torch.Tensor, x: torch.Tensor, ctx, group: LoraGroup) -> None:
        """The shrink of this rank's input columns of A, an all-reduce of the partial
        [tokens, max_rank], and the expand of its rows of B into its slice of y."""
        be, pool, lora = ctx.backend, ctx.pool, ctx.lora
        pages, tables = pool.layer(self.layer), pool.lora_tables
        (m, _, _), = group.members
        cols = self.lora_outputs
        v = self.tp.all_reduce(be.lora_shrink(x, pages, tables, m, lora), "lora")
        be.lora_expand(y[:, cols], v, pages, tables, m, lora)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = self.gemm(x)
        self.add_lora(y, x, ctx)
        return self.tp.all_reduce(y)
