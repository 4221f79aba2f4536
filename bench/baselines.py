"""The baselines the serving benchmark measures beside the services, in the same run, on the
same device, with the same requests:

* the in-process Engine (no gRPC): `build_engine`, then driver.run_engine;
* Hugging Face PEFT with mixed-adapter batches (`adapter_names=`), on a fixed sample of the
  requests: `run_peft`, on an HF LlamaForCausalLM holding the very weights our worker makes
  (models/loader.py init_dummy, mapped onto its state dict) and the same adapters;
* the roofline: the bytes a decode step must read (weights, the batch's KV cache, the rows of
  the distinct adapters in the batch) over the copy bandwidth measured in this run, as
  tokens/s (`measure_copy_bandwidth`, `decode_roofline`).

The base model with no adapters is the same workload with no adapter named; it runs through
the services like the others (serving.py).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import numpy as np
import torch

from slora.bench.driver import NOT_YET, Progress, RequestRecord, RunResult, new_record
from slora.bench.workload import (
    DUMMY_TARGETS, DummyAdapter, DummyAdapterFactory, Workload, adapter_bytes,
)
from slora.common.config import STANDARD_LORA_MODULES, ModelConfig

# -- the in-process engine -----------------------------------------------------------------


def build_engine(engine_argv: list[str], adapters: list[DummyAdapter],
                 peft_paths: dict[str, str] | None = None, backend: str = "auto",
                 prepare_ranks=()):
    """An Engine built from the worker's own flags, serving `adapters`: made in host memory
    from their seeds, or, given `peft_paths` (adapter id -> PEFT folder), read from there."""
    from slora.bench.dummy_worker import install_dummy_adapters, use_dummy_followers
    from slora.worker.args import add_engine_args, engine_config_from_args
    from slora.engine.engine import Engine
    from slora.scheduler.adapter_residency import AdapterRef

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config, model_path = engine_config_from_args(parser.parse_args(engine_argv))
    if peft_paths is None:  # tensor-parallel followers make the same dummy adapters
        use_dummy_followers(prepare_ranks)
    engine = Engine(config, model_path, backend)
    if peft_paths is not None:
        for a in adapters:
            engine.add_adapter(a.adapter_id, peft_paths[a.adapter_id])
        return engine
    install_dummy_adapters(engine.worker, prepare_ranks)
    for a in adapters:  # what Engine.add_adapter records, without a folder to validate
        engine.adapters[a.adapter_id] = AdapterRef(
            a.adapter_id, a.path, config.model.adapter_num_pages(a.module_ranks()))
    return engine


# -- Hugging Face PEFT ---------------------------------------------------------------------

def llama_hf_config(model: ModelConfig) -> dict:
    """The dummy Llama as LlamaConfig keyword arguments."""
    d = {
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads, "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim, "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta, "max_position_embeddings": model.max_position_embeddings,
        "tie_word_embeddings": model.tie_word_embeddings, "bos_token_id": model.bos_token_id,
        "eos_token_id": list(model.eos_token_ids),
    }
    if model.rope_scaling is not None:
        d["rope_scaling"] = dict(model.rope_scaling)
    return d


def build_hf_model(model: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device):
    """LlamaForCausalLM with the dummy weights our worker makes from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slora.kernels.torch_backend import TorchBackend
    from slora.models.loader import checkpoint_tensors
    from slora.models.registry import build_model, family_of

    config = LlamaConfig(**llama_hf_config(model), pad_token_id=0)
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    ours = build_model(model, None, TorchBackend(), dtype, device, seed)
    state = checkpoint_tensors(ours, family_of(model.model_type))
    hf_model.load_state_dict(state, strict=True, assign=True)
    if model.tie_word_embeddings:
        hf_model.tie_weights()
    # Buffers are not in the state dict: make the rotary tables on the device.
    with torch.device(device):
        hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(config)
    leftover = [n for n, t in list(hf_model.named_parameters()) + list(hf_model.named_buffers())
                if t.is_meta]
    assert not leftover, f"HF model tensors left unset: {leftover[:5]}"
    hf_model.generation_config.eos_token_id = None
    return hf_model.eval()


def build_peft_model(hf_model, factory: DummyAdapterFactory, adapters: list[DummyAdapter]):
    """A PeftModel holding every adapter of `adapters` under its id, weights copied from the
    host-memory dummy adapters (the same tensors our worker serves)."""
    from peft import LoraConfig, get_peft_model

    def lora_config(a: DummyAdapter) -> LoraConfig:
        return LoraConfig(r=a.rank, lora_alpha=a.lora_alpha, target_modules=list(DUMMY_TARGETS),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(hf_model, lora_config(adapters[0]),
                                    adapter_name=adapters[0].adapter_id)
        for a in adapters[1:]:
            peft_model.add_adapter(a.adapter_id, lora_config(a))
    layers = peft_model.base_model.model.model.layers
    device = next(hf_model.parameters()).device
    with torch.no_grad():
        for a in adapters:
            lora = factory.make(a.adapter_id, a.path, a.rank, a.seed)
            for m in DUMMY_TARGETS:
                w_a, w_b = lora.weights[m]  # [L, r, d_in], [L, d_out, r]
                for i, layer in enumerate(layers):
                    module = getattr(layer.self_attn, m)
                    module.lora_A[a.adapter_id].weight.copy_(w_a[i].to(device))
                    module.lora_B[a.adapter_id].weight.copy_(w_b[i].to(device))
    return peft_model.eval()


PEFT_BASE_NAME = "__base__"
"""PEFT's adapter_names entry for a request with no adapter."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _peft_batch(model, batch: list, names: list[str], device: torch.device, start: float,
                records: list[RequestRecord], progress: Progress) -> list[list[int]]:
    """Greedy decoding of one left-padded batch for max(output_len) steps (PEFT's way of
    batching: the batch runs until its longest request ends); returns each one's tokens."""
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[i, width - len(r.prompt_token_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                adapter_names=names)
    past, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1)
    tokens = [next_ids]
    _sync(device)
    now = time.perf_counter() - start
    for rec in records:
        rec.first_token_s = now
    lengths = [r.output_len for r in batch]
    for step in range(1, max(lengths)):
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=past, use_cache=True, adapter_names=names)
        past, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1)
        tokens.append(next_ids)
        if step + 1 in lengths:
            _sync(device)
            now = time.perf_counter() - start
            for rec in records:
                if rec.output_len == step + 1:
                    rec.end_s, rec.num_output_tokens = now, rec.output_len
                    progress.update()
    _sync(device)
    now = time.perf_counter() - start
    for rec in records:
        if rec.end_s is NOT_YET:  # output_len 1: done at prefill
            rec.end_s, rec.num_output_tokens = now, rec.output_len
            progress.update()
    all_tokens = torch.stack(tokens, dim=1).tolist()
    return [all_tokens[i][:n] for i, n in enumerate(lengths)]


def run_peft(model: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device,
             workload: Workload, batch_size: int, label: str | None = None) -> RunResult:
    """PEFT on `workload` (a small sample): every request is there at t = 0 (which only helps
    PEFT), taken in arrival order in batches of `batch_size` that mix adapters through
    `adapter_names`. Throughput counts as the driver's: completed over the whole wall time."""
    used = sorted({a for r in workload.requests if (a := workload.adapter_id(r)) is not None})
    by_id = {a.adapter_id: a for a in workload.adapters}
    factory = DummyAdapterFactory(model, dtype, pin_memory=False, seed=seed)
    hf_model = build_hf_model(model, seed, dtype, device)
    peft_model = (build_peft_model(hf_model, factory, [by_id[a] for a in used]) if used
                  else hf_model)
    progress = Progress(len(workload.requests), label or workload.name)
    records = [new_record(workload, r) for r in workload.requests]
    call = peft_model if used else _NoAdapterNames(hf_model)
    outputs = []
    start = time.perf_counter()
    for lo in range(0, len(workload.requests), batch_size):
        batch = workload.requests[lo:lo + batch_size]
        names = [workload.adapter_id(r) or PEFT_BASE_NAME for r in batch]
        outputs += _peft_batch(call, batch, names, device, start,
                               records[lo:lo + batch_size], progress)
    wall_s = time.perf_counter() - start
    progress.close()
    result = RunResult(workload.name, "peft", None, len(workload.adapters), records, wall_s)
    result.outputs = outputs  # greedy tokens, for tests that compare them with the engine's
    return result


class _NoAdapterNames:
    """The bare HF model called like a PeftModel (which takes adapter_names)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, adapter_names=None, **kwargs):
        return self.model(**kwargs)


# -- the roofline --------------------------------------------------------------------------

def measure_copy_bandwidth(device: torch.device, num_bytes: int | None = None,
                           reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus written (as
    bench/kernels.py does); median of `reps` copies."""
    if num_bytes is None:
        num_bytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.ones(num_bytes // 2, dtype=torch.float16, device=device)  # num_bytes bytes
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    src_bytes = src.numel() * src.element_size()
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * src_bytes / statistics.median(times)


def decode_weight_bytes(model: ModelConfig, dtype_size: int) -> int:
    """Bytes of the weights one decode step reads: every projection, the norms, lm_head."""
    per_layer = sum(i * o for i, o in map(model.module_shape, STANDARD_LORA_MODULES))
    per_layer += 2 * model.hidden_size
    return dtype_size * (model.num_layers * per_layer + model.vocab_size * model.hidden_size
                         + model.hidden_size)


def mean_decode_context(workload: Workload) -> float:
    """Mean context length over the workload's decode tokens: request (p, n) decodes its
    tokens 2..n at contexts p+1 .. p+n-1 (its first token comes from the prefill)."""
    total = count = 0
    for r in workload.requests:
        p, n = len(r.prompt_token_ids), r.output_len
        if n > 1:
            total += (n - 1) * p + (n - 1) * n / 2
            count += n - 1
    return total / count if count else float(np.mean([len(r.prompt_token_ids)
                                                       for r in workload.requests]))


def expected_adapter_bytes(workload: Workload, batch: int, dtype_size: int,
                           model: ModelConfig) -> tuple[float, float]:
    """(expected distinct adapters, expected bytes of their rows) in a decode batch of
    `batch` requests drawn from the workload's adapter frequencies."""
    if not workload.adapters:
        return 0.0, 0.0
    counts = np.bincount([r.adapter_index for r in workload.requests],
                         minlength=len(workload.adapters)).astype(np.float64)
    p = counts / counts.sum()
    present = 1.0 - (1.0 - p) ** batch
    sizes = np.array([adapter_bytes(model, a.rank, dtype_size) for a in workload.adapters],
                     dtype=np.float64)
    return float(present.sum()), float((present * sizes).sum())


def decode_roofline(model: ModelConfig, dtype_size: int, workload: Workload, batch: int,
                    copy_bytes_per_s: float) -> dict:
    """The decode-step roofline of `workload` at `batch` running requests: the bytes a step
    must read over the measured copy bandwidth, as tokens/s and requests/s. Prefill is left
    out (it is compute, not bytes), so this bound is a little generous."""
    batch = max(1, min(batch, len(workload.requests)))
    weights = decode_weight_bytes(model, dtype_size)
    kv_per_token = 2 * model.num_layers * model.kv_dim * dtype_size
    context = mean_decode_context(workload)
    num_adapters, lora = expected_adapter_bytes(workload, batch, dtype_size, model)
    step_bytes = weights + batch * context * kv_per_token + lora
    step_s = step_bytes / copy_bytes_per_s
    tokens_per_s = batch / step_s
    mean_output = workload.num_output_tokens / len(workload.requests)
    return {
        "batch": batch, "mean_context": context, "weight_bytes": weights,
        "kv_bytes": batch * context * kv_per_token, "adapter_bytes": lora,
        "distinct_adapters": num_adapters, "step_bytes": step_bytes, "step_s": step_s,
        "copy_bytes_per_s": copy_bytes_per_s, "output_tokens_per_s": tokens_per_s,
        "throughput_rps": tokens_per_s / mean_output if mean_output else math.nan,
    }


def measure_gemm_rate(device: torch.device, dtype: torch.dtype, size: int | None = None,
                      reps: int = 10) -> float:
    """FLOP/s of one square GEMM of `size` (8192 on CUDA, bench/kernels.py's GEMM rate, near
    the device's peak: the roofline then holds prefill to the fastest rate; 512 on the CPU)
    in `dtype`, counting 2 m n k; median of `reps`."""
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(times)


def prefill_flops(model: ModelConfig, workload: Workload) -> float:
    """FLOPs of the workload's prefills: every projection on every prompt token, causal
    attention (QK^T and PV over the tokens before each), and lm_head on the last token only
    (the one sampled). LoRA's share is left out (under 1% at the paper's ranks)."""
    per_token = 2 * model.num_layers * sum(
        i * o for i, o in map(model.module_shape, STANDARD_LORA_MODULES))
    attention = 2 * 2 * model.num_layers * model.q_dim  # per (query, key) pair: QK and PV
    total = 0.0
    for r in workload.requests:
        p = len(r.prompt_token_ids)
        total += per_token * p + attention * p * (p + 1) / 2 + 2 * model.vocab_size * \
            model.hidden_size
    return total


def serving_roofline(model: ModelConfig, dtype_size: int, workload: Workload, batch: float,
                     copy_bytes_per_s: float, gemm_flops_per_s: float) -> dict:
    """The whole workload's floor at `batch` running requests (the batch a run reached):
    its prefill FLOPs at the measured GEMM rate, plus its decode steps (each of `batch`
    tokens after a request's first, which its prefill samples) at the bytes each must read
    over the measured copy bandwidth (`decode_roofline`). Tokens/s and requests/s are the
    workload's totals over that time."""
    batch = max(1, int(round(batch)))
    decode = decode_roofline(model, dtype_size, workload, batch, copy_bytes_per_s)
    num_requests = len(workload.requests)
    num_tokens = workload.num_output_tokens
    prefill_s = prefill_flops(model, workload) / gemm_flops_per_s
    decode_s = max(0, num_tokens - num_requests) / decode["batch"] * decode["step_s"]
    total_s = prefill_s + decode_s
    return {
        **{f"decode_{k}": v for k, v in decode.items()},
        "batch": decode["batch"], "gemm_flops_per_s": gemm_flops_per_s,
        "copy_bytes_per_s": copy_bytes_per_s, "prefill_s": prefill_s, "decode_s": decode_s,
        "total_s": total_s, "output_tokens_per_s": num_tokens / total_s,
        "throughput_rps": num_requests / total_s,
    }
