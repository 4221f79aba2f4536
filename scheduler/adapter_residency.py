"""Which adapters are resident in the unified pool, in which slot and pages.

An adapter is loaded when a request that needs it is admitted, or earlier, prefetched for
the next requests in the queue; it is pinned while any running request uses it
(`num_refs`), and evicted least recently used, once unreferenced, when its pages or its
slot are wanted. Loads and evictions are written into the step
command; the worker copies the rows from its host cache into the pages named there.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from slora.protos.step import AdapterLoad, StepCommand
from slora.scheduler.page_table import PageOwner, PageTable

MAX_RECENT_LOADS = 4096
"""Loads remembered between two reports (a report runs every heartbeat at least)."""


@dataclass(frozen=True)
class AdapterRef:
    """What the scheduler knows of an adapter: an id, where its files are, its size."""

    adapter_id: str
    path: str
    num_pages: int


@dataclass
class ResidentAdapter:
    ref: AdapterRef
    slot: int
    page_ids: list[int]
    num_refs: int = 0


class AdapterResidency:
    def __init__(self, max_slots: int, page_table: PageTable):
        self.page_table = page_table
        self.free_slots = list(range(max_slots - 1, -1, -1))
        # Least recently used first; move_to_end on every use.
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self.num_loads = 0
        self.num_evictions = 0
        self.num_prefetches = 0
        self.num_idle_pages = 0
        """Pages of the resident adapters no running request uses (evictable)."""
        self.recent_loads: list[tuple[str, int]] = []
        """(adapter id, pages) of each load since `take_recent_loads`, in order (the replica
        registry's report replays them: scheduler/replica_report.py)."""

    def slot_of(self, adapter_id: str) -> int | None:
        entry = self.resident.get(adapter_id)
        return None if entry is None else entry.slot

    def _evict_one(self, cmd: StepCommand, keep=frozenset()) -> bool:
        """Evicts the least recently used unreferenced adapter not in `keep`; False if
        there is none."""
        for adapter_id, entry in self.resident.items():
            if entry.num_refs == 0 and adapter_id not in keep:
                del self.resident[adapter_id]
                self.num_idle_pages -= len(entry.page_ids)
                self.page_table.free(entry.page_ids, PageOwner("adapter", adapter_id))
                self.free_slots.append(entry.slot)
                cmd.adapter_evictions.append(entry.slot)
                # A load of the same step into this slot is superseded by the eviction.
                cmd.adapter_loads = [l for l in cmd.adapter_loads if l.slot != entry.slot]
                self.num_evictions += 1
                return True
        return False

    def make_room(self, num_pages: int, cmd: StepCommand) -> bool:
        """Evicts unreferenced adapters until `num_pages` pages are free."""
        while self.page_table.num_free < num_pages:
            if not self._evict_one(cmd):
                return False
        return True

    def acquire(self, ref: AdapterRef, cmd: StepCommand, reserve_pages: int = 0) -> int | None:
        """Pins the adapter for one more request, loading it if needed with `reserve_pages`
        pages left free besides it; returns its slot, or None if it cannot be made room for
        now (nothing changes then, but unreferenced adapters may have been evicted)."""
        entry = self.resident.get(ref.adapter_id)
        if entry is None:
            if not self.free_slots and not self._evict_one(cmd):
                return None
            if not self.make_room(ref.num_pages + reserve_pages, cmd):
                return None
            slot = self.free_slots.pop()
            page_ids = self.page_table.allocate(ref.num_pages,
                                                PageOwner("adapter", ref.adapter_id))
            entry = ResidentAdapter(ref, slot, page_ids, num_refs=1)
            self.resident[ref.adapter_id] = entry
            cmd.adapter_loads.append(AdapterLoad(ref.adapter_id, ref.path, slot, page_ids))
            self._count_load(ref)
        else:
            entry.num_refs += 1  # pinned first, so making room never evicts it
            if entry.num_refs == 1:
                self.num_idle_pages -= len(entry.page_ids)
            if not self.make_room(reserve_pages, cmd):
                self._unpin(entry)
                return None
            self.resident.move_to_end(ref.adapter_id)
        return entry.slot

    def prefetch(self, ref: AdapterRef, cmd: StepCommand, keep_free: int,
                 keep=frozenset()) -> bool:
        """Loads an adapter a queued request will need, unpinned, so that its copy to the
        GPU overlaps the steps before that request is admitted, leaving `keep_free` pages
        free. For its pages and its slot it may evict least recently used unreferenced
        adapters, but none in `keep` (those the next queued requests need): at high load
        idle adapters fill every page the KV cache leaves, and a prefetch that took free
        pages only would never run ahead (issue 28: 0 of 361 loads did). Nothing is evicted
        unless the prefetch then fits."""
        if ref.adapter_id in self.resident:
            return False
        need = ref.num_pages + keep_free
        if self.page_table.num_free + self.evictable_pages(keep) < need:
            return False
        if not self.free_slots and not self._evict_one(cmd, keep):
            return False
        while self.page_table.num_free < need:
            if not self._evict_one(cmd, keep):
                return False
        slot = self.free_slots.pop()
        page_ids = self.page_table.allocate(ref.num_pages, PageOwner("adapter", ref.adapter_id))
        self.resident[ref.adapter_id] = ResidentAdapter(ref, slot, page_ids)
        self.num_idle_pages += ref.num_pages
        cmd.adapter_loads.append(AdapterLoad(ref.adapter_id, ref.path, slot, page_ids))
        self._count_load(ref)
        self.num_prefetches += 1
        return True

    def evictable_pages(self, keep=frozenset()) -> int:
        """Pages of the unreferenced adapters not in `keep` (`keep`: a few ids)."""
        kept = sum(len(e.page_ids) for a in keep
                   if (e := self.resident.get(a)) is not None and e.num_refs == 0)
        return self.num_idle_pages - kept

    def _count_load(self, ref: AdapterRef) -> None:
        self.num_loads += 1
        if len(self.recent_loads) < MAX_RECENT_LOADS:
            self.recent_loads.append((ref.adapter_id, ref.num_pages))

    def take_recent_loads(self) -> list[tuple[str, int]]:
        loads, self.recent_loads = self.recent_loads, []
        return loads

    def release(self, adapter_id: str) -> None:
        entry = self.resident[adapter_id]
        assert entry.num_refs > 0, f"adapter {adapter_id!r} released more than acquired"
        self._unpin(entry)

    def _unpin(self, entry: ResidentAdapter) -> None:
        entry.num_refs -= 1
        if entry.num_refs == 0:
            self.num_idle_pages += len(entry.page_ids)

    def drop(self, adapter_id: str, cmd: StepCommand) -> bool:
        """Evicts an unreferenced adapter now (its registration was deleted)."""
        entry = self.resident.get(adapter_id)
        if entry is None or entry.num_refs:
            return entry is None
        self.resident.move_to_end(adapter_id, last=False)
        return self._evict_one(cmd)

    def owners(self) -> dict[PageOwner, list[int]]:
        return {PageOwner("adapter", a): e.page_ids for a, e in self.resident.items()}
