"""Adapters off the GPU: PEFT parsing and validation, and the host-memory cache; adapter
metadata and the registry of replicas in Redis.

The names below load on first use (PEP 562), so a process that needs only the Redis side
(the scheduler publishing to the registry of replicas) does not import torch."""
import importlib

_LAZY = {
    "HostAdapterCache": "slora.adapter_store.host_cache",
    "AdapterSpec": "slora.adapter_store.peft",
    "LoraAdapter": "slora.adapter_store.peft",
    "check_base_model": "slora.adapter_store.peft",
    "load_peft_adapter": "slora.adapter_store.peft",
    "read_adapter_config": "slora.adapter_store.peft",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
