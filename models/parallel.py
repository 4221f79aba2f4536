"""The tensor-parallel group a model's layers are sharded over (DESIGN.md, Tensor parallelism).

Every layer of models/ is written for a group of `size` ranks and holds only its rank's
shard: column-parallel layers a slice of the outputs, row-parallel layers a slice of the
inputs (then one all-reduce), grouped-query K/V heads split across ranks and copied where
there are fewer KV heads than ranks. With size 1 (today's worker) every shard is the whole
tensor and the collectives are no-ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slora.common.errors import ConfigError


@dataclass(frozen=True)
class TensorParallel:
    size: int = 1
    """Ranks in the group."""
    rank: int = 0
    """This process's rank, in [0, size)."""

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"tensor parallel: rank {self.rank} of size {self.size}")

    def split(self, n: int, what: str) -> int:
        """This rank's share of `n` (a width or a head count) split evenly."""
        if n % self.size:
            raise ConfigError(f"{what} = {n} does not split over {self.size} tensor-parallel "
                              "ranks")
        return n // self.size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(KV heads this rank holds, the first of them): split across ranks, or each head
        copied to size / num_kv_heads ranks when there are fewer heads than ranks."""
        if num_kv_heads >= self.size:
            local = self.split(num_kv_heads, "num_key_value_heads")
            return local, self.rank * local
        if self.size % num_kv_heads:
            raise ConfigError(f"num_key_value_heads = {num_kv_heads} cannot be copied evenly "
                              f"over {self.size} tensor-parallel ranks")
        return 1, self.rank // (self.size // num_kv_heads)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group, in place."""
        if self.size > 1:
            torch.distributed.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] on each rank -> [rows, size * cols], rank order along the columns."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()
"""One rank: no sharding."""
