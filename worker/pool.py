"""The unified pool's memory, owned by the worker: one tensor of pages for the KV cache
and the resident adapters' rows, and the LoRA page tables of the resident adapters.

`pages` [num_layers, num_pages, 2, H]: a page is the same index at every layer, so one
page id holds a token's K and V at all layers, or one rank-row of an adapter module at all
layers (A's row in half 0, B's column in half 1; kernels/torch_ref.py has the layout).
The scheduler says which page ids to use; this class only writes them.
"""
from __future__ import annotations

import torch

from slora.adapter_store import LoraAdapter
from slora.common.config import LORA_MODULE_INDEX, LORA_MODULES, ModelConfig, PoolConfig


class UnifiedPool:
    def __init__(self, model: ModelConfig, pool: PoolConfig, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
        self.num_pages = pool.num_pages
        h = model.hidden_size
        self.pages = torch.zeros(model.num_layers, pool.num_pages, 2, h, dtype=dtype,
                                 device=device)
        num_modules, slots = len(LORA_MODULES), pool.max_adapter_slots
        self.max_pages_per_row = model.max_lora_pages_per_row
        # Per module, contiguous: lora_page_table[m] is a kernel's [slots, rank, n] table.
        self.lora_page_table = torch.zeros(num_modules, slots, pool.max_lora_rank,
                                           self.max_pages_per_row, dtype=torch.int32,
                                           device=device)
        self.lora_ranks = torch.zeros(num_modules, slots, dtype=torch.int32, device=device)
        self.lora_scales = torch.zeros(num_modules, slots, dtype=torch.float32, device=device)

    def layer(self, i: int) -> torch.Tensor:
        """[num_pages, 2, H] view of layer i."""
        return self.pages[i]

    def load_adapter(self, slot: int, adapter: LoraAdapter, page_ids: list[int]) -> None:
        """Writes the adapter's rows into its pages and fills its page-table entries."""
        h, num_layers = self.model.hidden_size, self.model.num_layers
        device = self.pages.device
        offset = 0
        self.evict_adapter(slot)
        for module in LORA_MODULES:
            rank = adapter.module_ranks.get(module, 0)
            if rank == 0:
                continue
            n = self.model.lora_pages_per_row(module)
            pages = torch.tensor(page_ids[offset:offset + rank * n], dtype=torch.int64,
                                 device=device).view(rank, n)
            offset += rank * n
            a, b = adapter.weights[module]  # [L, r, d_in], [L, d_out, r]
            for half, rows in ((0, a), (1, b.transpose(1, 2))):
                padded = torch.zeros(num_layers, rank, n * h, dtype=self.pages.dtype,
                                     device=device)
                padded[:, :, :rows.shape[2]] = rows.to(device=device, dtype=self.pages.dtype,
                                                       non_blocking=True)
                self.pages[:, pages, half] = padded.view(num_layers, rank, n, h)
            m = LORA_MODULE_INDEX[module]
            self.lora_page_table[m, slot, :rank, :n] = pages.to(torch.int32)
            self.lora_ranks[m, slot] = rank
            self.lora_scales[m, slot] = adapter.module_scales[module]
        assert offset == len(page_ids), (
            f"adapter {adapter.adapter_id!r}: {len(page_ids)} pages given, {offset} needed")

    def evict_adapter(self, slot: int) -> None:
        self.lora_ranks[:, slot] = 0
        self.lora_scales[:, slot] = 0.0

    def evict_all(self) -> None:
        self.lora_ranks.zero_()
        self.lora_scales.zero_()
