"""Host-memory cache of parsed adapters, least recently used out first, bounded by bytes.

The worker asks it for an adapter's tensors before copying them into pool pages; a hit
costs a dict look-up, a miss reads and validates the PEFT folder (milliseconds to seconds).
Thread-safe: concurrent misses of one adapter load it once (the others wait for that load),
and loads of different adapters run in parallel outside the lock.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable

import torch

from slora.adapter_store.peft import LoraAdapter, load_peft_adapter
from slora.common.config import ModelConfig
from slora.common.errors import ConfigError

Loader = Callable[[str, str], LoraAdapter]
"""(adapter_id, path) -> LoraAdapter."""


class HostAdapterCache:
    """LRU of LoraAdapters keyed by adapter id, holding at most `capacity_bytes` of weights.

    `loader` defaults to load_peft_adapter with the `model`, `max_rank`, `dtype` and
    `pin_memory` given here. An adapter larger than the whole capacity is returned but not
    kept (and evicts nothing). A cached adapter asked for under another path is reloaded.
    """

    def __init__(self, capacity_bytes: int, loader: Loader | None = None, *,
                 model: ModelConfig | None = None, max_rank: int | None = None,
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False):
        if capacity_bytes < 0:
            raise ConfigError(f"host cache: capacity_bytes must be >= 0, got {capacity_bytes}")
        if loader is None:
            if model is None or max_rank is None:
                raise ConfigError("host cache: give a loader, or the model and max_rank for "
                                  "the default PEFT loader")

            def loader(adapter_id: str, path: str) -> LoraAdapter:
                return load_peft_adapter(adapter_id, path, model, max_rank, dtype, pin_memory)

        self.capacity_bytes = capacity_bytes
        self._loader = loader
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()  # oldest use first
        self._loading: dict[tuple[str, str], Future] = {}
        self._generation: dict[str, int] = {}  # bumped by invalidate: stale loads not kept
        self.num_bytes = 0
        """Bytes of the adapters held now."""
        self.hits = self.misses = self.evictions = 0

    def get(self, adapter_id: str, path: str) -> LoraAdapter:
        """The adapter, from the cache or loaded (AdapterError from the loader propagates)."""
        with self._lock:
            adapter = self._entries.get(adapter_id)
            if adapter is not None and adapter.path == path:
                self._entries.move_to_end(adapter_id)
                self.hits += 1
                return adapter
            self.misses += 1
            future = self._loading.get((adapter_id, path))
            owner = future is None
            if owner:
                future = self._loading[(adapter_id, path)] = Future()
                generation = self._generation.get(adapter_id, 0)
        if not owner:
            return future.result()
        try:
            adapter = self._loader(adapter_id, path)
        except BaseException as e:
            with self._lock:
                del self._loading[(adapter_id, path)]
            future.set_exception(e)
            raise
        with self._lock:
            del self._loading[(adapter_id, path)]
            if self._generation.get(adapter_id, 0) == generation:
                self._insert(adapter_id, adapter)
        future.set_result(adapter)
        return adapter

    def _insert(self, adapter_id: str, adapter: LoraAdapter) -> None:
        """Keep the adapter, evicting least recently used ones until it fits. Holds the lock."""
        self._remove(adapter_id)
        size = adapter.num_bytes
        if size > self.capacity_bytes:
            return
        while self.num_bytes + size > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= old.num_bytes
            self.evictions += 1
        self._entries[adapter_id] = adapter
        self.num_bytes += size

    def _remove(self, adapter_id: str) -> bool:
        adapter = self._entries.pop(adapter_id, None)
        if adapter is None:
            return False
        self.num_bytes -= adapter.num_bytes
        return True

    def invalidate(self, adapter_id: str) -> bool:
        """Drop the adapter (after its files change or it is unregistered); True if it was
        held. A load already in flight is returned to its callers but not kept."""
        with self._lock:
            self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1
            return self._remove(adapter_id)

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def adapter_ids(self) -> list[str]:
        """Held adapters, least recently used first."""
        with self._lock:
            return list(self._entries)
