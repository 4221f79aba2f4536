"""The worker: executes step commands on one device and returns step results.

It owns the pool's memory, the model, the host-memory adapter cache and per-request state
(token ids, pages, progress), so a running request costs the command only its new page ids.
Each step it turns the command into the model's batch: decode requests (one new token)
first, then prefill chunks, as kernels/backend.py requires.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slora.adapter_store import HostAdapterCache, load_peft_adapter
from slora.common.config import EngineConfig
from slora.kernels.backend import AttentionBatch, LoraBatch, get_backend
from slora.protos.step import NO_ADAPTER_SLOT, StepCommand, StepResult
from slora.common.sampling_params import SamplingParams
from slora.worker.model import ForwardBatch, LlamaModel
from slora.worker.pool import UnifiedPool
from slora.worker.sampling import sample
from slora.worker.weights import dummy_weights, load_hf_weights

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    page_ids: list[int]
    num_computed_tokens: int
    adapter_slot: int
    sampling: SamplingParams


@dataclass
class _Scheduled:
    state: RequestState
    num_new: int


class Worker:
    def __init__(self, config: EngineConfig, model_path: str | None = None,
                 backend: str = "auto"):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        cfg = config.model
        if model_path is None:
            weights = dummy_weights(cfg, config.seed, self.dtype, self.device)
        else:
            weights = load_hf_weights(cfg, model_path, self.dtype, self.device)
        self.backend = get_backend(self.device, backend)
        self.model = LlamaModel(cfg, weights, self.backend)
        self.pool = UnifiedPool(cfg, config.pool, self.dtype, self.device)
        pin = self.device.type == "cuda"
        self.host_cache = HostAdapterCache(
            config.host_cache_bytes,
            lambda adapter_id, path: load_peft_adapter(
                adapter_id, path, cfg, config.pool.max_lora_rank, self.dtype, pin_memory=pin))
        self.requests: dict[str, RequestState] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.keep_logits = False
        """Tests set this to read each step's logits back (`last_logits`)."""
        self.last_logits: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Drops every request and resident adapter: the state of a new Steps stream, and
        of the worker after a failed step (the scheduler forgets its side too)."""
        self.requests.clear()
        self.last_logits = {}
        self.pool.evict_all()

    def execute(self, cmd: StepCommand) -> StepResult:
        start = time.perf_counter()
        for req_id in cmd.finished_req_ids:
            self.requests.pop(req_id, None)
        for slot in cmd.adapter_evictions:
            self.pool.evict_adapter(slot)
        for load in cmd.adapter_loads:
            adapter = self.host_cache.get(load.adapter_id, load.path)
            self.pool.load_adapter(load.slot, adapter, load.page_ids)

        scheduled = []
        for new in cmd.new_requests:
            state = RequestState(new.req_id, list(new.token_ids), new.num_prompt_tokens,
                                 list(new.page_ids), 0, new.adapter_slot, new.sampling)
            self.requests[new.req_id] = state
            scheduled.append(_Scheduled(state, new.num_scheduled_tokens))
        for run in cmd.running_requests:
            state = self.requests[run.req_id]
            assert state.num_computed_tokens == run.num_computed_tokens, (
                f"{run.req_id}: worker has {state.num_computed_tokens} tokens computed, "
                f"scheduler says {run.num_computed_tokens}")
            state.page_ids += run.new_page_ids
            scheduled.append(_Scheduled(state, run.num_scheduled_tokens))
        if not scheduled:
            return StepResult(cmd.step_id, step_time_s=time.perf_counter() - start)

        # Decode requests first, then prefill chunks (the kernels' order).
        scheduled.sort(key=lambda s: s.num_new != 1)
        batch, sampled = self._build_batch(scheduled)
        logits = self.model.forward(batch, self.pool)
        for s in scheduled:
            s.state.num_computed_tokens += s.num_new

        result = StepResult(cmd.step_id)
        if sampled:
            params = [s.sampling for s in sampled]
            out_idx = [len(s.token_ids) - s.num_prompt_tokens for s in sampled]
            token_ids, logprobs = sample(logits, params, out_idx, self.generator)
            for state, token_id in zip(sampled, token_ids):
                state.token_ids.append(token_id)
            result.req_ids = [s.req_id for s in sampled]
            result.token_ids, result.logprobs = token_ids, logprobs
            if self.keep_logits:
                self.last_logits = {s.req_id: logits[i].cpu() for i, s in enumerate(sampled)}
        result.step_time_s = time.perf_counter() - start
        return result

    def _build_batch(self, scheduled: list[_Scheduled]):
        input_ids, positions, token_page_ids, token_slots = [], [], [], []
        context_lens, query_start_loc, logits_indices = [], [0], []
        seg_starts, seg_slots = [], []
        sampled: list[RequestState] = []
        num_decode = 0
        for s in scheduled:
            st, start = s.state, s.state.num_computed_tokens
            end = start + s.num_new
            if s.num_new == 1:
                num_decode += 1
            else:
                seg_starts.append(len(input_ids))
                seg_slots.append(st.adapter_slot)
            input_ids += st.token_ids[start:end]
            positions += range(start, end)
            token_page_ids += st.page_ids[start:end]
            token_slots += [st.adapter_slot] * s.num_new
            context_lens.append(end)
            query_start_loc.append(len(input_ids))
            if end == len(st.token_ids):
                logits_indices.append(len(input_ids) - 1)
                sampled.append(st)
        seg_starts.append(len(input_ids))
        max_ctx = max(context_lens)
        kv_page_table = [s.state.page_ids[:max_ctx] + [0] * (max_ctx - len(s.state.page_ids))
                         for s in scheduled]

        def t(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype, device=self.device)

        attn = AttentionBatch(
            kv_page_table=t(kv_page_table), context_lens=t(context_lens),
            query_start_loc=t(query_start_loc), token_page_ids=t(token_page_ids),
            num_decode_reqs=num_decode,
            max_query_len=max(s.num_new for s in scheduled), max_context_len=max_ctx)
        lora = LoraBatch(
            token_slots=t(token_slots), num_decode_tokens=num_decode,
            seg_starts=t(seg_starts), seg_slots=t(seg_slots),
            any_lora=any(slot != NO_ADAPTER_SLOT for slot in token_slots))
        batch = ForwardBatch(t(input_ids, torch.int64), t(positions, torch.int64), attn, lora,
                             t(logits_indices, torch.int64))
        return batch, sampled
