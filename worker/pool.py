"""The unified pool's memory, owned by the worker: one tensor of pages for the KV cache
and the resident adapters' rows, and the LoRA page tables of the resident adapters.

`pages` [num_layers, num_pages + 1, 2, H]: a page is the same index at every layer, so one
page id holds a token's K and V at all layers, or one rank-row of an adapter module at all
layers (A's row in half 0, B's column in half 1; kernels/torch_ref.py has the layout).
The scheduler says which page ids to use; this class only writes them. The extra page,
`scratch_page` (= num_pages), is the worker's own: padding tokens of a CUDA-graph batch
write their K/V there and the scheduler never hands it out.

Adapter loads come in two halves, so that the copy over PCIe overlaps compute. On CUDA,
`load_adapter` queues the host-to-device copy of the adapter's (pinned) weights into a
staging buffer on a side stream and returns at once; `commit_loads` later makes the
current stream wait for that copy (a GPU-side wait, the host does not block) and writes
the rows into their pages and the slot's page-table entries there. The pages themselves
are only ever written on the current stream, in step order, because the previous step may
still be reading pages that the scheduler has since freed and handed to this adapter.

Tensor parallelism: each rank's pool holds its shard (models/sharding.py). A page id is the
same slot on every rank; each half of a rank's page is `plan.page_width` wide (about H / N):
its K/V heads of a token, or its shard of an adapter row. A module of rank r takes
R = padded_rank(r) rank-rows of pages on every rank, as at N = 1. Row i's pages hold B's
rank-row i (the rank's output columns) in their V halves, and for a row-parallel module A's
row i (the rank's input columns) in their K halves. A column-parallel module's A rows are
dealt out (row j * N + p to rank p) and each is whole (d_in = H wide): rank p lays its local
row j over the K halves of the first pages of rows j * N .. j * N + N - 1, and reads it through
`lora_shrink_page_table` [num_modules, slots, R / N, N], with `lora_shrink_ranks` rows.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
from dataclasses import dataclass

import torch

from slora.adapter_store import LoraAdapter
from slora.common.config import ModelConfig, PoolConfig
from slora.kernels.backend import LoraTables
from slora.kernels.torch_backend import TorchBackend
from slora.models.sharding import COLUMN_PARALLEL, ShardPlan, shard_lora, shrink_rank


def shard_adapter(adapter: LoraAdapter, plan: ShardPlan, pin_memory: bool) -> LoraAdapter:
    """The adapter with only this rank's shard of each module's A and B (contiguous copies,
    pinned when asked), as the host cache keeps it: each rank copies only its shard."""
    weights = {}
    for module, (a, b) in adapter.weights.items():
        a, b = (t.contiguous().clone() for t in shard_lora(plan, module, a, b))
        weights[module] = (a.pin_memory(), b.pin_memory()) if pin_memory else (a, b)
    return dataclasses.replace(adapter, weights=weights)


@dataclass
class _PendingLoad:
    """An adapter whose rows are on their way to the device (or, on the CPU, ready)."""

    adapter: LoraAdapter
    """Held so its pinned host memory outlives the copy."""
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """module -> (A [L, r, d_in], B [L, d_out, r]) on the pool's device (staging)."""
    page_ids: torch.Tensor
    """[num_pages] int64 on the device: the adapter's pages, in the model's lora_modules
    order."""
    ranks: torch.Tensor
    """[num_modules] int32 on the device: the slot's new lora_ranks column."""
    scales: torch.Tensor
    """[num_modules] float32 on the device: the slot's new lora_scales column."""
    copied: torch.cuda.Event | None
    """Recorded on the copy stream after the last copy; None on the CPU."""
    shrink_ranks: torch.Tensor | None = None
    """[num_modules] int32 on the device: the slot's new lora_shrink_ranks column (tensor
    parallelism only)."""


def zeros_taken_as_used(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose memory the kernel provides page by page as it is first
    touched (an anonymous mapping reads as zeros until written): an idle CPU worker's
    resident memory does not include the pool it has not used yet. torch.zeros would write
    every byte at start."""
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(num_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=num_bytes)  # keeps `buffer` alive
    return flat.view(dtype).view(shape)


class UnifiedPool:
    def __init__(self, model: ModelConfig, pool: PoolConfig, dtype: torch.dtype,
                 device: torch.device, backend=None, plan: ShardPlan | None = None):
        """`backend` (kernels/backend.py) writes loaded adapters' rows into their pages;
        the torch reference when None. `plan`: this rank's shard (tensor parallelism)."""
        self.model = model
        self.plan = plan
        self.backend = backend if backend is not None else TorchBackend()
        self.num_pages = pool.num_pages
        self.scratch_page = pool.num_pages
        """A page outside the scheduler's range, for the padding of graph batches."""
        h = self.page_width(model, plan)
        shape = (model.num_layers, pool.num_pages + 1, 2, h)
        self.pages = (torch.zeros(shape, dtype=dtype, device=device)
                      if torch.device(device).type == "cuda" else zeros_taken_as_used(shape, dtype))
        self.lora_modules = model.lora_modules
        self.module_index = model.lora_module_index
        num_modules, slots = len(self.lora_modules), pool.num_adapter_slots
        self.max_pages_per_row = model.max_lora_pages_per_row
        # Per module, contiguous: lora_page_table[m] is a kernel's [slots, rank, n] table.
        self.lora_page_table = torch.zeros(num_modules, slots, pool.max_lora_rank,
                                           self.max_pages_per_row, dtype=torch.int32,
                                           device=device)
        self.lora_ranks = torch.zeros(num_modules, slots, dtype=torch.int32, device=device)
        self.lora_scales = torch.zeros(num_modules, slots, dtype=torch.float32, device=device)
        self.lora_tables = LoraTables(self.lora_page_table, self.lora_ranks, self.lora_scales)
        """The three tables as the backend takes them (the same tensors, updated in place)."""
        self.lora_shrink_page_table = self.lora_shrink_ranks = self.lora_shrink_tables = None
        if plan is not None:
            n = plan.size
            self.lora_shrink_page_table = torch.zeros(
                num_modules, slots, model.padded_rank(pool.max_lora_rank) // n, n,
                dtype=torch.int32, device=device)
            self.lora_shrink_ranks = torch.zeros(num_modules, slots, dtype=torch.int32,
                                                 device=device)
            self.lora_shrink_tables = LoraTables(self.lora_shrink_page_table,
                                                 self.lora_shrink_ranks, self.lora_scales)
            """The column-parallel modules' A rows of this rank, as the backend takes them."""
        self._cuda = self.pages.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.pages.device) if self._cuda else None
        self.slot_modules: list[frozenset[str]] = [frozenset()] * slots
        """Host copy of the projections each slot's adapter targets (no device sync)."""
        self._pending: dict[int, _PendingLoad] = {}
        """slot -> its load, between load_adapter and commit_loads."""

    @staticmethod
    def page_width(model: ModelConfig, plan: ShardPlan | None = None) -> int:
        """Elements in each half (K, V) of one layer's page: the hidden size, or this rank's
        shard of it."""
        return model.hidden_size if plan is None else plan.page_width

    @staticmethod
    def table_bytes_per_slot(model: ModelConfig, max_lora_rank: int,
                             tensor_parallel_size: int = 1) -> int:
        """Device bytes the LoRA tables take per adapter slot (one slot per page: see
        PoolConfig.num_adapter_slots): a page-table entry per rank-row and page of each
        module, and a rank and a scale per module (the single-GPU layout above); with
        tensor parallelism also the shrink tables (an entry per padded rank-row and a rank
        per module)."""
        num_modules = len(model.lora_modules)
        nbytes = 4 * num_modules * (max_lora_rank * model.max_lora_pages_per_row + 2)
        if tensor_parallel_size > 1:
            nbytes += 4 * num_modules * (model.padded_rank(max_lora_rank) + 1)
        return nbytes

    def layer(self, i: int) -> torch.Tensor:
        """[num_pages + 1, 2, H] view of layer i."""
        return self.pages[i]

    # -- adapters -------------------------------------------------------------------------

    def load_adapter(self, slot: int, adapter: LoraAdapter, page_ids: list[int]) -> None:
        """Starts copying the adapter's rows to the device (side stream on CUDA); they
        reach their pages, and the slot its page-table entries, at `commit_loads`. Until
        then the slot reads as empty (rank 0)."""
        needed = self.model.adapter_num_pages(adapter.module_ranks)
        assert needed == len(page_ids), (
            f"adapter {adapter.adapter_id!r}: {len(page_ids)} pages given, {needed} needed")
        self.evict_adapter(slot)
        self.slot_modules[slot] = frozenset(adapter.module_ranks)
        device = self.pages.device
        ranks = torch.zeros(len(self.lora_modules), dtype=torch.int32)
        scales = torch.zeros(len(self.lora_modules), dtype=torch.float32)
        for module, rank in adapter.module_ranks.items():
            ranks[self.module_index[module]] = rank
            scales[self.module_index[module]] = adapter.module_scales[module]
        small = (torch.tensor(page_ids, dtype=torch.int64), ranks, scales)
        if self.plan is not None:
            small += (torch.tensor([shrink_rank(self.plan, int(ranks[m])) for m in
                                    range(len(self.lora_modules))], dtype=torch.int32),)
        if not self._cuda:
            self._pending[slot] = _PendingLoad(adapter, dict(adapter.weights), *small[:3],
                                               None, *small[3:])
            return
        small = tuple(t.pin_memory() for t in small)
        with torch.cuda.stream(self._copy_stream):
            rows = {m: (a.to(device, non_blocking=True), b.to(device, non_blocking=True))
                    for m, (a, b) in adapter.weights.items()}
            small = tuple(t.to(device, non_blocking=True) for t in small)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        self._pending[slot] = _PendingLoad(adapter, rows, *small[:3], copied, *small[3:])

    def commit_loads(self, slots=None) -> None:
        """Writes the rows of the pending loads (of `slots`, or all) into their pages and
        fills their slots' page-table entries, on the current stream."""
        for slot in [s for s in self._pending if slots is None or s in slots]:
            load = self._pending.pop(slot)
            if load.copied is not None:
                stream = torch.cuda.current_stream(self.pages.device)
                stream.wait_event(load.copied)
                # Staged on the copy stream, read here: keep the memory until this stream is done.
                for t in (load.page_ids, load.ranks, load.scales,
                          *(x for ab in load.rows.values() for x in ab),
                          *(() if load.shrink_ranks is None else (load.shrink_ranks,))):
                    t.record_stream(stream)
            self._write_rows(slot, load)

    def _write_rows(self, slot: int, load: _PendingLoad) -> None:
        offset = 0
        for module in self.lora_modules:
            if module not in load.rows:
                continue
            a, b = load.rows[module]  # [L, r, d_in], [L, d_out, r] (this rank's shards)
            rank = b.shape[2]
            padded = self.model.padded_rank(rank)
            n = self.model.lora_pages_per_row(module)
            pages = load.page_ids[offset:offset + padded * n].view(padded, n)
            offset += padded * n
            m = self.module_index[module]
            if self.plan is not None and module in COLUMN_PARALLEL:
                shrink_pages = pages[:, 0].reshape(padded // self.plan.size, self.plan.size)
                self.backend.write_adapter_rows(self.pages, a, shrink_pages[:a.shape[1]], 0)
                self.lora_shrink_page_table[m, slot, :shrink_pages.shape[0]] = shrink_pages
            else:
                self.backend.write_adapter_rows(self.pages, a, pages[:rank], 0)
            self.backend.write_adapter_rows(self.pages, b.transpose(1, 2), pages[:rank], 1)
            self.lora_page_table[m, slot, :rank, :n] = pages[:rank]
        self.lora_ranks[:, slot] = load.ranks
        self.lora_scales[:, slot] = load.scales
        if load.shrink_ranks is not None:
            self.lora_shrink_ranks[:, slot] = load.shrink_ranks

    def modules_of(self, slots) -> frozenset[str]:
        """The projections targeted by the adapters in these slots (NO_ADAPTER ignored)."""
        return frozenset().union(*(self.slot_modules[s] for s in slots if s >= 0))

    def evict_adapter(self, slot: int) -> None:
        self.slot_modules[slot] = frozenset()
        self._pending.pop(slot, None)
        self.lora_ranks[:, slot] = 0
        self.lora_scales[:, slot] = 0.0
        if self.lora_shrink_ranks is not None:
            self.lora_shrink_ranks[:, slot] = 0

    def evict_all(self) -> None:
        self.slot_modules = [frozenset()] * len(self.slot_modules)
        self._pending.clear()
        self.lora_ranks.zero_()
        self.lora_scales.zero_()
        if self.lora_shrink_ranks is not None:
            self.lora_shrink_ranks.zero_()
