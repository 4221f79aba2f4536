"""The token embedding and the lm_head, split over the vocabulary across ranks; tied
(the lm_head reads the embedding's weight) when the family's checkpoint says so."""
from __future__ import annotations

import torch

from slora.common.errors import ConfigError
from slora.models.parallel import TensorParallel


class VocabEmbedding(torch.nn.Module):
    """This rank's rows [first, first + num_rows) of the [vocab, hidden] embedding; a token
    outside them contributes zeros, and the all-reduce gives every rank the whole row."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.num_rows = tp.split(vocab_size, "vocab_size")
        self.first = tp.rank * self.num_rows
        self.weight = torch.nn.Parameter(torch.empty(self.num_rows, hidden),
                                         requires_grad=False)

    def weight_loader(self, param, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.dim() != 2 or loaded.shape[1] != param.shape[1] \
                or loaded.shape[0] != self.num_rows * self.tp.size:
            raise ConfigError(f"shape {tuple(loaded.shape)}, expected "
                              f"({self.num_rows * self.tp.size}, {param.shape[1]})")
        param.data.copy_(loaded.narrow(0, self.first, self.num_rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.weight[input_ids]  # [num_tokens, hidden]
        local = input_ids - self.first
        inside = (local >= 0) & (local < self.num_rows)
        h = self.weight[torch.where(inside, local, 0)] * inside.unsqueeze(1).to(self.weight.dtype)
        return self.tp.all_reduce(h, "embed")


class LMHead(VocabEmbedding):
    """float32 logits [num_tokens, vocab]: this rank's vocabulary slice, then gathered."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel,
                 tied: VocabEmbedding | None):
        super().__init__(vocab_size, hidden, tp)
        if tied is not None:
            self.weight = tied.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(x @ self.weight.T, "lm_head").float()
