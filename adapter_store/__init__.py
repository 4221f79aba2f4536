"""Adapters off the GPU: PEFT parsing and validation, and the host-memory cache."""
from slora.adapter_store.host_cache import HostAdapterCache
from slora.adapter_store.peft import (
    AdapterSpec,
    LoraAdapter,
    check_base_model,
    load_peft_adapter,
    read_adapter_config,
)

__all__ = [
    "AdapterSpec", "HostAdapterCache", "LoraAdapter", "check_base_model", "load_peft_adapter",
    "read_adapter_config",
]
