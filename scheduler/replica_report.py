"""What this replica tells the registry of replicas: its load and which adapters it holds,
on the GPU and in its worker's host memory (the publishing itself is in
scheduler/registration.py; the Redis schema in adapter_store/replicas.py).

The GPU set is the planner's residency, exactly. The host-memory set is a mirror of the
worker's HostAdapterCache kept here without asking the worker: the worker reads an adapter
through that cache exactly when a step command loads it, in the order the scheduler sent
them, so replaying the residency's loads through an LRU of the same capacity gives the same
contents, up to the size of each adapter, taken here as its pages' bytes (an upper estimate:
pages also hold the padding of rows shorter than a page). A worker that lost its state
starts with an empty cache, and so does the mirror.
"""
from __future__ import annotations

from collections import OrderedDict

from slora.common.config import EngineConfig
from slora.scheduler.planner import Scheduler

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class HostCacheMirror:
    """An LRU of adapter ids bounded by bytes, like adapter_store/host_cache.py's."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, int] = OrderedDict()
        self.num_bytes = 0

    def touch(self, adapter_id: str, num_bytes: int) -> None:
        if adapter_id in self._entries:
            self._entries.move_to_end(adapter_id)
            return
        if num_bytes > self.capacity_bytes:
            return  # returned by the cache but not kept, evicting nothing
        self._entries[adapter_id] = num_bytes
        self.num_bytes += num_bytes
        while self.num_bytes > self.capacity_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.num_bytes -= dropped

    def discard(self, adapter_id: str) -> None:
        self.num_bytes -= self._entries.pop(adapter_id, 0)

    def clear(self) -> None:
        self._entries.clear()
        self.num_bytes = 0

    def ids(self) -> set[str]:
        return set(self._entries)


class ReplicaReport:
    """Reads the planner (on the event loop's thread, between steps) into what the
    registry holds."""

    def __init__(self, planner: Scheduler, config: EngineConfig):
        self.planner = planner
        self.config = config
        self.page_bytes = (2 * config.model.hidden_size * config.model.num_layers
                           * DTYPE_BYTES.get(config.dtype, 4))
        self.host = HostCacheMirror(config.host_cache_bytes)

    def snapshot(self, worker_available: bool):
        """(ReplicaLoad fields as a dict, GPU adapter ids, host-memory adapter ids)."""
        residency = self.planner.residency
        for adapter_id, num_pages in residency.take_recent_loads():
            self.host.touch(adapter_id, num_pages * self.page_bytes)
        if not worker_available:
            self.host.clear()
        gpu = set(residency.resident) if worker_available else set()
        load = dict(num_running=len(self.planner.running),
                    num_waiting=len(self.planner.waiting),
                    num_free_pages=self.planner.page_table.num_free,
                    num_pages=self.planner.page_table.num_pages,
                    max_num_seqs=self.config.scheduler.max_num_seqs,
                    available=worker_available)
        return load, gpu, self.host.ids() | gpu
