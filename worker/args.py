"""The model and pool flags, and the EngineConfig they give.

Owner: worker/. Every process that builds a worker (the worker process, the in-process
engine's tools, benchmarks) adds `add_engine_args` to its parser and calls
`engine_config_from_args`. The scheduler never parses these flags: it rebuilds the worker's
EngineConfig from the worker's Info (protos/model_info.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from slora.common.config import (
    STANDARD_LORA_MODULES, EngineConfig, MemorySizing, ModelConfig, PoolConfig, SchedulerConfig,
)
from slora.common.errors import ConfigError
from slora.models.registry import DUMMY_MODELS, dummy_model_config, model_config_from_folder
from slora.worker.memory_plan import batch_for_pool, pool_pages_for_bytes
from slora.worker.sizing import CPU_MAX_NUM_SEQS, cpu_pool_sizing

TENSOR_PARALLEL_ENV = "SLORA_TENSOR_PARALLEL_SIZE"
"""The default of --tensor-parallel-size (compose sets it)."""
GPU_MEMORY_UTILIZATION = 0.9
"""Default --gpu-memory-utilization: the share of the GPU's memory the worker may use."""
ACTIVATION_RESERVE_BYTES = 1 << 30
"""Left free besides the weights and the pool, for activations and CUDA graphs, by the
provisional estimate (the GPUs then measure them: memory_plan.py)."""
log = logging.getLogger("slora.worker")

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_MODEL = "default"
"""--model value for SmolLM2-135M-Instruct, converted once into --data-dir."""


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and pool")
    g.add_argument("--model", required=True,
                   help="a Hugging Face model folder (config.json + *.safetensors) of a "
                        "supported family (llama, mistral, qwen2, qwen3); "
                        f"'{DEFAULT_MODEL}' for SmolLM2-135M-Instruct (converted once into "
                        "--data-dir); or a dummy model with seeded random weights: "
                        f"{', '.join(DUMMY_MODELS)}")
    g.add_argument("--data-dir", default="~/.slora",
                   help=f"where --model {DEFAULT_MODEL} is converted to (models/)")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and pool; auto: bfloat16 on CUDA, float32 on the CPU")
    g.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    g.add_argument("--num-pages", type=int, default=None,
                   help="pages in the unified pool (default: on CUDA, what is left of "
                        "--gpu-memory-utilization after the weights, activations and CUDA "
                        "graphs, as measured at start; on the CPU, KV for --max-num-seqs "
                        "requests of --max-model-len tokens and one adapter of --max-lora-rank "
                        "for each: worker/sizing.py; the log says how the pool was sized)")
    g.add_argument("--pool-gib", type=float, default=None,
                   help="the unified pool's size in GiB instead (CUDA)")
    g.add_argument("--gpu-memory-utilization", type=float, default=GPU_MEMORY_UTILIZATION,
                   help="share of the GPU's total memory this worker may use: weights, pool, "
                        "activations, CUDA graphs (the worker logs its memory plan)")
    g.add_argument("--max-lora-rank", type=int, default=64,
                   help="highest adapter rank the pool accepts")
    g.add_argument("--max-adapter-slots", type=int, default=None,
                   help="deprecated: caps the adapters resident at once (default: no cap; "
                        "the pool's pages are the only bound)")
    g.add_argument("--host-cache-gib", type=float, default=4.0,
                   help="host memory for parsed adapters, GiB")
    g.add_argument("--seed", type=int, default=0, help="seed of dummy weights and sampling")
    g.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="worker processes, one per GPU (cuda:0 .. cuda:N-1), each holding a "
                        "1/N shard of the weights, the adapters and the pool (Megatron-style); "
                        f"on the CPU, N processes over gloo (default: ${TENSOR_PARALLEL_ENV}, "
                        "else 1)")
    g.add_argument("--collective-timeout-s", type=float, default=20.0,
                   help="with --tensor-parallel-size > 1: a collective that waits longer than "
                        "this for a rank takes the whole group down (a hung rank)")
    g = parser.add_argument_group("batching limits")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest context of one request, prompt + output tokens (default: "
                        f"the model's max_position_embeddings, at most {DEFAULT_MAX_MODEL_LEN})")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests running at once (the largest decode batch; default: on "
                        "CUDA, what the pool keeps at half of --max-model-len a request, at "
                        f"most 512; on the CPU, {CPU_MAX_NUM_SEQS})")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step: decode tokens plus prefill chunks")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run every step eagerly instead of replaying CUDA graphs (on "
                        "CUDA, graphs of decode and mixed steps are captured at start-up, "
                        "and for a new set of LoRA projections on first use)")


def _pick_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return device


def _dtype_size(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _weight_bytes(model: ModelConfig, dtype_size: int) -> int:
    per_layer = sum(i * o for i, o in map(model.module_shape, STANDARD_LORA_MODULES))
    embeddings = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
    return dtype_size * (model.num_layers * per_layer + embeddings)


def pool_page_bytes(model: ModelConfig, dtype_size: int, tensor_parallel_size: int) -> int:
    """Bytes of one pool page on a GPU: with tensor parallelism, of the widest rank's shard."""
    from slora.models.sharding import shard_plan

    n = tensor_parallel_size
    page_width = max(shard_plan(model, rank, n).page_width for rank in range(n))
    return model.num_layers * 2 * page_width * dtype_size


def default_num_pages(model: ModelConfig, pool_rank: int, max_model_len: int, dtype: str,
                      device: str, tensor_parallel_size: int = 1,
                      utilization: float = GPU_MEMORY_UTILIZATION) -> int:
    """Pages for the pool when no flag gives them, by estimate: on CUDA what fits in
    `utilization` of the free memory after the weights and ACTIVATION_RESERVE_BYTES (the
    provisional number the GPUs then replace by their measured plan, memory_plan.py).
    With tensor parallelism each GPU holds its shard of each page (the widest rank's counts)
    and about 1/N of the weights (free memory measured on the first GPU; the ranks' GPUs are
    alike)."""
    import torch

    dtype_size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    n = tensor_parallel_size
    page_bytes = pool_page_bytes(model, dtype_size, n)
    max_adapter_pages = model.adapter_num_pages({m: pool_rank for m in model.lora_modules})
    if not device.startswith("cuda"):  # the CPU has its own rule: sizing.cpu_pool_sizing
        return cpu_pool_sizing(model, max_lora_rank=pool_rank, max_model_len=max_model_len,
                               max_num_seqs=CPU_MAX_NUM_SEQS, max_adapter_slots=None,
                               dtype=dtype, tensor_parallel_size=n).num_pages
    free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    budget = (int(free_bytes * utilization) - _weight_bytes(model, dtype_size) // n
              - ACTIVATION_RESERVE_BYTES)
    num_pages = budget // page_bytes
    if num_pages < max_model_len + max_adapter_pages:
        raise ConfigError(
            f"{device} has {free_bytes / 2**30:.1f} GiB free: room for {max(num_pages, 0)} "
            f"pages after the weights, but one request of max_model_len {max_model_len} with "
            f"an adapter of rank {pool_rank} needs {max_model_len + max_adapter_pages}")
    return num_pages


def engine_config_from_args(args: argparse.Namespace) -> tuple[EngineConfig, str | None]:
    """(the config, the model folder or None for a dummy model). Raises ConfigError."""
    if args.model in DUMMY_MODELS:
        model, model_path = dummy_model_config(args.model), None
    elif args.model == DEFAULT_MODEL:
        from slora.models.gguf_convert import ensure_default_model

        model_path = ensure_default_model(os.path.expanduser(args.data_dir))
        model = model_config_from_folder(model_path)
    elif os.path.isdir(args.model):
        model, model_path = model_config_from_folder(args.model), args.model
    else:
        raise ConfigError(f"--model {args.model!r} is neither a folder, nor "
                          f"{DEFAULT_MODEL!r}, nor a dummy model ({', '.join(DUMMY_MODELS)})")
    device = _pick_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device.startswith("cuda") else "float32")
    max_model_len = args.max_model_len or min(model.max_position_embeddings,
                                              DEFAULT_MAX_MODEL_LEN)
    tp = getattr(args, "tensor_parallel_size", None)
    if tp is None:
        env = os.environ.get(TENSOR_PARALLEL_ENV, "1")
        try:
            tp = int(env)
        except ValueError:
            raise ConfigError(f"${TENSOR_PARALLEL_ENV}={env!r} is not an integer") from None
    model = dataclasses.replace(model, lora_rank_multiple=tp)
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got "
                          f"{args.gpu_memory_utilization}")
    cuda = device.startswith("cuda")
    num_pages, sizing = args.num_pages, None
    if num_pages is None and args.pool_gib is not None:
        if args.pool_gib <= 0:
            raise ConfigError(f"--pool-gib must be positive, got {args.pool_gib}")
        page_bytes = pool_page_bytes(model, _dtype_size(dtype), tp)
        num_pages = pool_pages_for_bytes(args.pool_gib * 2**30, page_bytes)
    if num_pages is None and not cuda:
        cpu = cpu_pool_sizing(
            model, max_lora_rank=args.max_lora_rank, max_model_len=max_model_len,
            max_num_seqs=args.max_num_seqs or CPU_MAX_NUM_SEQS,
            max_adapter_slots=args.max_adapter_slots, dtype=dtype, tensor_parallel_size=tp)
        num_pages = cpu.num_pages
        log.info("unified pool: %s", cpu.reason)
    if num_pages is None:
        num_pages = default_num_pages(model, args.max_lora_rank, max_model_len, dtype, device,
                                      tp, args.gpu_memory_utilization)
        if cuda:
            sizing = MemorySizing(args.gpu_memory_utilization,
                                  size_batch=args.max_num_seqs is None)
    max_num_seqs = args.max_num_seqs or (
        batch_for_pool(num_pages, max_model_len) if cuda else CPU_MAX_NUM_SEQS)
    if args.max_adapter_slots is not None:
        log.warning("--max-adapter-slots %d is deprecated: it caps the adapters resident at "
                    "once below what the pool's pages allow; leave it out to let the pool "
                    "alone bound them", args.max_adapter_slots)
    config = EngineConfig(
        model=model,
        pool=PoolConfig(num_pages=num_pages, max_adapter_slots=args.max_adapter_slots,
                        max_lora_rank=args.max_lora_rank),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=max_model_len,
            max_queue_len=getattr(args, "max_queue_len", SchedulerConfig.max_queue_len)),
        dtype=dtype, device=device, host_cache_bytes=int(args.host_cache_gib * 2**30),
        seed=args.seed, tensor_parallel_size=tp, memory_sizing=sizing)
    return config, model_path
