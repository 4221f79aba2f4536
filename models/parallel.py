"""The tensor-parallel group a model's layers are sharded over (DESIGN.md, Tensor parallelism).

Every layer of models/ is written for a group of `size` ranks and holds only its rank's
shard, cut as models/sharding.py's ShardPlan says: column-parallel layers a slice of the
outputs, row-parallel layers a slice of the inputs (then one all-reduce), grouped-query K/V
heads split across ranks in whole groups and copied where there are fewer KV heads than
ranks. With size 1 every shard is the whole tensor and the collectives are no-ops.

The collectives go through `comm` when the worker group gives one (worker/tp_group.py: its
own process group, a timeout on each collective, the values each kind of collective moves
counted); without it, through torch.distributed's default group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slora.common.config import ModelConfig
from slora.common.errors import ConfigError
from slora.models.sharding import ShardPlan, shard_plan


@dataclass(frozen=True)
class TensorParallel:
    size: int = 1
    """Ranks in the group."""
    rank: int = 0
    """This process's rank, in [0, size)."""
    comm: object = field(default=None, compare=False, repr=False)
    """The group's TensorParallelComm (all_reduce(t, kind), all_gather(t, kind)), or None."""

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"tensor parallel: rank {self.rank} of size {self.size}")

    def plan(self, cfg: ModelConfig) -> ShardPlan:
        """This rank's slices of the model (ConfigError if it cannot be cut)."""
        return shard_plan(cfg, self.rank, self.size)

    def split(self, n: int, what: str) -> int:
        """This rank's share of `n` split evenly (the vocabulary)."""
        if n % self.size:
            raise ConfigError(f"{what} = {n} does not split over {self.size} tensor-parallel "
                              "ranks")
        return n // self.size

    def all_reduce(self, x: torch.Tensor, kind: str = "base") -> torch.Tensor:
        """Sum of x over the group, in place."""
        if self.size == 1:
            return x
        if self.comm is not None:
            return self.comm.all_reduce(x, kind)
        torch.distributed.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """[size, *x.shape]: every rank's x, in rank order."""
        if self.comm is not None:
            return self.comm.all_gather(x, kind)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    def all_gather(self, x: torch.Tensor, kind: str = "base") -> torch.Tensor:
        """[rows, cols] on each rank -> [rows, size * cols], rank order along the columns."""
        if self.size == 1:
            return x
        return torch.cat(list(self.gather(x, kind)), dim=-1)


SINGLE = TensorParallel()
"""One rank: no sharding."""
