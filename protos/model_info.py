"""The worker's EngineConfig as it crosses processes: in the worker's Info (ModelInfo).

ModelInfo.model_config_json holds the model as `ModelConfig.to_dict()` (the family already
resolved from config.json: shapes, features and LoRA targets, so a frontend validates
adapters against exactly what the worker serves without knowing any family), plus one key of
ours, "slora", with the rest of the worker's EngineConfig: pool, scheduler limits, dtype,
device, seed, host cache size. The flat fields of ModelInfo (num_pages, max_lora_rank, ...)
repeat what a frontend needs without the JSON. The scheduler never parses model or pool
flags: it rebuilds the worker's EngineConfig from the Info, so the planner and the worker
cannot disagree about the model or the pool.
"""
from __future__ import annotations

import dataclasses
import json
import os

from slora.common.config import EngineConfig, ModelConfig, PoolConfig, SchedulerConfig
from slora.common.errors import ConfigError
from slora.v1 import scheduler_pb2

SLORA_KEY = "slora"
"""The key of model_config_json holding the worker's EngineConfig besides the model."""


def model_info_from_config(config: EngineConfig,
                           model_path: str | None) -> scheduler_pb2.ModelInfo:
    """`model_path`: the model folder, None for dummy weights."""
    model = config.model
    d = model.to_dict()
    d[SLORA_KEY] = {
        "pool": dataclasses.asdict(config.pool),
        "scheduler": dataclasses.asdict(config.scheduler),
        "dtype": config.dtype, "device": config.device,
        "host_cache_bytes": config.host_cache_bytes, "seed": config.seed,
        "tensor_parallel_size": config.tensor_parallel_size,
    }
    return scheduler_pb2.ModelInfo(
        model_name=model.name, vocab_size=model.vocab_size,
        max_model_len=config.scheduler.max_model_len, max_lora_rank=config.pool.max_lora_rank,
        num_pages=config.pool.num_pages, hidden_size=model.hidden_size,
        eos_token_ids=list(model.eos_token_ids), model_config_json=json.dumps(d),
        model_path=os.path.abspath(model_path) if model_path else "")


def engine_config_from_model_info(info: scheduler_pb2.ModelInfo) -> EngineConfig:
    """The worker's EngineConfig, exactly, from its Info. Raises ConfigError when the JSON
    lacks our key (a worker of another version)."""
    try:
        d = json.loads(info.model_config_json)
        ours = d.pop(SLORA_KEY)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"worker Info: model_config_json has no {SLORA_KEY!r} section "
                          f"with the engine config ({e!r})") from None
    return EngineConfig(
        model=ModelConfig.from_dict(d),
        pool=PoolConfig(**ours["pool"]), scheduler=SchedulerConfig(**ours["scheduler"]),
        dtype=ours["dtype"], device=ours["device"],
        host_cache_bytes=ours["host_cache_bytes"], seed=ours["seed"],
        tensor_parallel_size=ours.get("tensor_parallel_size", 1))


def model_config_from_model_info(info: scheduler_pb2.ModelInfo) -> ModelConfig:
    """The model alone (what a frontend needs), from the worker's Info."""
    d = json.loads(info.model_config_json)
    d.pop(SLORA_KEY, None)
    return ModelConfig.from_dict(d)
