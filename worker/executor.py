"""The worker: executes step commands on one device and returns step results.

It owns the pool's memory, the model, the host-memory adapter cache and per-request state
(token ids, progress, a row of the device page table), so a running request costs the command
only its new page ids. Each step it turns the command into the model's batch (worker/batch.py:
decode requests first, then prefill chunks, as kernels/backend.py requires), runs it, as a
CUDA-graph replay when the backend is CUDA and the step fits a graph bucket
(worker/cuda_graphs.py), eagerly otherwise, and samples.

Who calls whom, one way: the executor builds the batch (worker/batch.py), which asks the
graph cache (worker/cuda_graphs.py) for the step's bucket; the executor drives captures and
replays. Neither calls back into the executor.

A request that fails alone (its sampling raised; its adapter's files changed since
registration, so the load failed) is dropped and listed in the result's `request_errors`
(the adapter in `adapter_errors`, its slot left empty); the step's other requests run. A
whole step that fails (a bug, a kernel error) leaves the worker empty (every request and
adapter slot dropped, as `reset`) and comes back as a StepResult with `error` set, the
same object the in-process engine reads and the worker server puts on the wire. With a
tensor-parallel group every rank must run the same requests, so there any failure fails the
whole step; an adapter whose files broke is found on rank 0 before any rank starts the step
and named in `adapter_errors` beside `error` (the scheduler ends its requests and requeues
the others without counting it against them).

Nothing a step does on the host grows with the requests' contexts or with the number of
registered adapters: the page table stays on the device and takes only the step's new page
ids; adapters are known to the worker only by the slots the scheduler loads.

Tensor parallelism (config.tensor_parallel_size N > 1): this object is one rank of the group
(tp_group.py), holding its shard of the weights, of the pool and of every adapter it copies
(models/sharding.py). Rank 0, the one built without a `group`, starts the others and is the
only one its owner calls: `execute` hands each command to the other ranks before running it
(adapters looked up in its host cache first, so an adapter error fails the step on rank 0
before any rank starts it), and only rank 0 samples; the tokens it sampled travel with its
next message, and `apply_sampled` appends them on the other ranks. A failure of the group
itself (TensorParallelGroupError) is not a step's failure: it propagates, for the owner to
take the group down. With N = 1 none of this runs: no group, no message, no collective.
"""
from __future__ import annotations

import logging
import time

import torch

from slora.adapter_store import HostAdapterCache, load_peft_adapter
from slora.common.config import EngineConfig
from slora.common.errors import AdapterError, ConfigError, TensorParallelGroupError
from slora.common.sampling_params import SamplingParams
from slora.kernels.backend import get_backend
from slora.models.parallel import TensorParallel
from slora.models.registry import build_model
from slora.models.sharding import check_shardable, shard_plan
from slora.protos.convert import step_command_to_proto
from slora.protos.step import StepCommand, StepResult
from slora.worker.batch import RequestState, ScheduledRequest, StepBatch, StepInputs
from slora.worker.cuda_graphs import DECODE, NO_MODULES, StepGraphs
from slora.worker.memory_plan import size_from_memory
from slora.worker.pool import UnifiedPool, shard_adapter
from slora.worker.sampling import sample
from slora.worker.tp_group import (
    DEFAULT_COLLECTIVE_TIMEOUT_S, EAGER, PING, RESET, STEP, TensorParallelGroup,
)
from slora.worker.tp_profile import step_kind

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


class Worker:
    def __init__(self, config: EngineConfig, model_path: str | None = None,
                 backend: str = "auto", cuda_graphs: bool = True, *,
                 group: TensorParallelGroup | None = None,
                 collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S):
        """`cuda_graphs`: replay steps from CUDA graphs (captured here) when the backend is
        CUDA; False runs every step eagerly. With config.tensor_parallel_size > 1 and no
        `group`, this is rank 0: it starts the other ranks (tp_group.py); a follower rank
        passes the group it joined."""
        self.config = config
        if config.tensor_parallel_size > 1 and group is None:
            check_shardable(config.model, config.tensor_parallel_size)  # before any rank starts
            group = TensorParallelGroup.launch(config, model_path, backend, cuda_graphs,
                                               collective_timeout_s)
        self.group = group
        self.is_driver = group is None or group.rank == 0
        """Rank 0 (or no group): samples, and answers its owner."""
        self._sampled_tokens: list[int] = []
        """Rank 0: tokens sampled since its last message to the other ranks."""
        self._awaiting_tokens: list[RequestState] = []
        """Other ranks: the requests whose tokens rank 0's next message carries."""
        try:
            self._build(model_path, backend, cuda_graphs)
            if group is not None and group.rank == 0:
                group.wait_ready()
        except BaseException:
            if group is not None and group.rank == 0:
                group.close()
            raise

    def _build(self, model_path: str | None, backend: str, cuda_graphs: bool) -> None:
        config, group = self.config, self.group
        cfg, sched = config.model, config.scheduler
        self.device = group.device if group is not None else torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.backend = get_backend(self.device, backend)
        tp = TensorParallel() if group is None else TensorParallel(group.size, group.rank,
                                                                   group.comm)
        plan = None if group is None else shard_plan(cfg, group.rank, group.size)
        self.shard = plan
        """This rank's shard of the model and the pool (None: the whole, no group)."""
        sizing = config.memory_sizing is not None and self.device.type == "cuda"
        free_at_start = torch.cuda.mem_get_info(self.device)[0] if sizing else 0
        self.model = build_model(cfg, model_path, self.backend, self.dtype, self.device,
                                 config.seed, tp)
        if sizing:  # rewrites config.pool.num_pages and config.scheduler.max_num_seqs
            size_from_memory(self, free_at_start)
        config.memory_sizing = None
        self.pool = UnifiedPool(cfg, config.pool, self.dtype, self.device, self.backend, plan)
        pin = self.device.type == "cuda"

        def load(adapter_id: str, path: str):
            adapter = load_peft_adapter(adapter_id, path, cfg, config.pool.max_lora_rank,
                                        self.dtype, pin_memory=pin and plan is None)
            return adapter if plan is None else shard_adapter(adapter, plan, pin)

        self.host_cache = HostAdapterCache(config.host_cache_bytes, load)
        self.requests: dict[str, RequestState] = {}
        self.failed_req_ids: set[str] = set()
        """Requests that failed alone (their state is dropped) and that the scheduler has
        not finished yet: its next command, planned before it knew, may still run them."""
        self.inputs = StepInputs(sched.max_num_seqs, sched.max_num_batched_tokens,
                                 sched.max_model_len, self.pool.scratch_page, self.device)
        self.graphs: StepGraphs | None = None
        self._graph_logits: torch.Tensor | None = None
        """[max rows, vocab] float32: the logits every graph writes (`_into_shared_logits`)."""
        if cuda_graphs and self.backend.name == "cuda":
            self.graphs = StepGraphs(frozenset(cfg.lora_modules),
                                     min(sched.max_num_seqs, sched.max_num_batched_tokens),
                                     sched.max_num_batched_tokens, self.device)
            for modules in self.graphs.startup_sets():
                self._capture(modules)
        self.use_cuda_graphs = self.graphs is not None
        """Benchmarks turn this off to time the same worker eagerly."""
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.keep_logits = False
        """Tests set this to read each step's logits back (`last_logits`)."""
        self.last_logits: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Drops every request and resident adapter: the state of a new Steps stream, and
        of the worker after a failed step (the scheduler forgets its side too). Rank 0 has
        the other ranks do the same."""
        if self.group is not None and self.is_driver:
            self.group.send(RESET)
        self._sampled_tokens, self._awaiting_tokens = [], []
        self.requests.clear()
        self.failed_req_ids.clear()
        self.inputs.free_all_rows()
        self.last_logits = {}
        self.pool.evict_all()

    def adopt_request(self, req_id: str, token_ids: list[int], num_prompt_tokens: int,
                      page_ids: list[int], adapter_slot: int,
                      sampling: SamplingParams) -> None:
        """Holds a request whose first len(page_ids) tokens already have their K/V in those
        pages, as if it had been prefilled (benchmarks time decode steps this way, without
        running the prefill). Its next step computes token_ids[len(page_ids)]."""
        if self.group is not None:
            raise ConfigError("adopt_request is not supported with tensor parallelism")
        assert len(page_ids) < len(token_ids), "a request needs a token to compute next"
        self._drop_request(req_id)
        state = RequestState(req_id, list(token_ids), num_prompt_tokens, len(page_ids),
                             adapter_slot, sampling, self.inputs.assign_row())
        self.inputs.kv_page_table[state.row, :len(page_ids)] = torch.tensor(
            page_ids, dtype=torch.int32)
        self.requests[req_id] = state

    def _drop_request(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.inputs.free_row(state.row)

    def execute(self, cmd: StepCommand) -> StepResult:
        """Runs one step. A failure comes back in the result (see the module docstring)."""
        try:
            if self.group is not None:
                self._send_step(cmd)
            return self.run_step(cmd)
        except TensorParallelGroupError:
            raise
        except AdapterError as e:  # with a TP group: found on rank 0 before any rank starts
            log.warning("step %d: %s", cmd.step_id, e)
            self.reset()
            return StepResult(cmd.step_id, error=str(e), adapter_errors={e.adapter_id: str(e)})
        except Exception as e:  # a bug: the scheduler retries this step's requests, serving goes on
            log.exception("step %d failed", cmd.step_id)
            self.reset()
            return StepResult(cmd.step_id, error=f"step {cmd.step_id} failed on the worker: "
                                                 f"{type(e).__name__}: {e}")

    # -- the group ------------------------------------------------------------------------

    def _send_step(self, cmd: StepCommand) -> None:
        """Rank 0: the command (and the tokens of the last step) to the other ranks."""
        for load in cmd.adapter_loads:  # an AdapterError here: no rank has started the step
            self.host_cache.get(load.adapter_id, load.path)
        self.group.send(STEP, step_command_to_proto(cmd).SerializeToString(),
                        self._sampled_tokens,
                        0 if self.use_cuda_graphs and not self._profiling() else EAGER)
        self._sampled_tokens = []

    def ping(self) -> None:
        """Rank 0 of a group: has every rank answer a collective (a hung one fails it
        within the collective timeout)."""
        self.group.send(PING, tokens=self._sampled_tokens)
        self._sampled_tokens = []
        self.group.ping()

    def apply_sampled(self, token_ids: list[int]) -> None:
        """Another rank: appends the tokens rank 0 sampled in the last step."""
        if len(token_ids) != len(self._awaiting_tokens):
            raise RuntimeError(f"rank 0 sent {len(token_ids)} sampled tokens; this rank "
                               f"awaits {len(self._awaiting_tokens)}")
        for state, token_id in zip(self._awaiting_tokens, token_ids):
            state.token_ids.append(token_id)
        self._awaiting_tokens = []

    def close(self) -> None:
        """Rank 0 of a group: stops the other ranks and leaves the group."""
        if self.group is not None and self.is_driver:
            self.group.close()

    # -- one step -------------------------------------------------------------------------

    def run_step(self, cmd: StepCommand) -> StepResult:
        """Runs the step on this rank alone, raising what fails (`execute` on rank 0)."""
        start = time.perf_counter()
        for req_id in cmd.finished_req_ids:
            self._drop_request(req_id)
            self.failed_req_ids.discard(req_id)
        for slot in cmd.adapter_evictions:
            self.pool.evict_adapter(slot)

        scheduled = []
        for new in cmd.new_requests:
            self._drop_request(new.req_id)
            self.failed_req_ids.discard(new.req_id)
            state = RequestState(new.req_id, list(new.token_ids), new.num_prompt_tokens, 0,
                                 new.adapter_slot, new.sampling, self.inputs.assign_row())
            self.requests[new.req_id] = state
            scheduled.append(ScheduledRequest(state, new.num_scheduled_tokens, new.page_ids))
        for run in cmd.running_requests:
            if run.req_id in self.failed_req_ids:
                continue
            state = self.requests[run.req_id]
            assert state.num_computed_tokens == run.num_computed_tokens, (
                f"{run.req_id}: worker has {state.num_computed_tokens} tokens computed, "
                f"scheduler says {run.num_computed_tokens}")
            scheduled.append(ScheduledRequest(state, run.num_scheduled_tokens,
                                              run.new_page_ids))
        result = StepResult(cmd.step_id)
        slots = {s.state.adapter_slot for s in scheduled}
        # Adapters this step uses are loaded before its forward pass. The others (prefetched
        # for queued requests) are loaded behind it: their host work (cache look-up, copy
        # launches, page writes) then overlaps the GPU running the step, and nothing of them
        # runs on the GPU ahead of it. A load that fails fails its adapter's requests alone.
        later = [load for load in cmd.adapter_loads if load.slot not in slots]
        failed_slot_to_adapter = {load.slot: load.adapter_id for load in cmd.adapter_loads
                                  if load.slot in slots and not self._load_adapter(load, result)}
        if failed_slot_to_adapter:
            scheduled = self._fail_requests(
                scheduled, failed_slot_to_adapter, result)
            slots -= set(failed_slot_to_adapter)
        if not scheduled:
            for load in later:
                self._load_adapter(load, result)
            self.pool.commit_loads()
            result.step_time_s = time.perf_counter() - start
            return result

        # Decode requests first, then prefill chunks (the kernels' order).
        scheduled.sort(key=lambda s: s.num_new != 1)
        lora_modules = self.pool.modules_of(slots)
        graphs = self.graphs if self.use_cuda_graphs and not self._profiling() else None
        if graphs is not None:
            lora_modules = graphs.lora_set(lora_modules)
            if not graphs.is_captured(lora_modules):
                self._capture(lora_modules)  # over padding inputs: before building the step
        with torch.inference_mode():
            step = self.inputs.build(scheduled, graphs)
            self.pool.commit_loads(slots)
            profile = self.group.comm.profile if self.group is not None else None
            if profile is not None:
                profile.begin_step(step_kind([s.num_new for s in scheduled]))
            logits = self._forward(step, lora_modules)
            if profile is not None:
                profile.end_step()
            for load in later:
                self._load_adapter(load, result)
            self.pool.commit_loads()
        for s in scheduled:
            s.state.num_computed_tokens += s.num_new

        sampled = step.sampled
        if sampled and not self.is_driver:
            self._awaiting_tokens = list(sampled)
        elif sampled:
            params = [s.sampling for s in sampled]
            out_idx = [len(s.token_ids) - s.num_prompt_tokens for s in sampled]
            token_ids, logprobs, errors = sample(logits, params, out_idx, self.generator)
            if errors and self.group is not None:  # every rank must keep the same requests
                raise RuntimeError(next(iter(errors.values())))
            if self.group is not None:
                self._sampled_tokens = token_ids
            if self.keep_logits:
                self.last_logits = {s.req_id: logits[i].cpu() for i, s in enumerate(sampled)}
            for i, state in enumerate(sampled):
                if i in errors:
                    self._fail_request(state.req_id, errors[i], result)
                    continue
                state.token_ids.append(token_ids[i])
                result.req_ids.append(state.req_id)
                result.token_ids.append(token_ids[i])
                result.logprobs.append(logprobs[i])
        result.step_time_s = time.perf_counter() - start
        return result

    def _profiling(self) -> bool:
        """Rank 0 profiles its collectives (tp_profile.py): every rank runs eagerly."""
        return self.group is not None and self.group.comm.profile is not None

    def _load_adapter(self, load, result: StepResult) -> bool:
        """Starts one AdapterLoad of a step command (its rows reach the pages at the pool's
        next commit_loads). On any failure (files changed or gone since registration, a
        size other than the scheduler's), records it in `result.adapter_errors`, leaves the
        slot empty and returns False."""
        try:
            adapter = self.host_cache.get(load.adapter_id, load.path)
            self.pool.load_adapter(load.slot, adapter, load.page_ids)
            return True
        except Exception as e:  # the adapter's own failure: no other slot is touched
            if self.group is not None:
                raise  # every rank must keep the same requests: the whole step fails
            self.pool.evict_adapter(load.slot)
            result.adapter_errors[load.adapter_id] = (
                str(e) if isinstance(e, AdapterError) else
                f"adapter {load.adapter_id!r} could not be loaded: {type(e).__name__}: {e}")
            return False

    def _fail_requests(self, scheduled: list[ScheduledRequest],
                       failed_slot_to_adapter: dict[int, str], result: StepResult
                       ) -> list[ScheduledRequest]:
        """Drops the state of the scheduled requests whose adapter did not load and records
        their error; returns the others."""
        kept = []
        for s in scheduled:
            adapter_id = failed_slot_to_adapter.get(s.state.adapter_slot)
            if adapter_id is None:
                kept.append(s)
                continue
            self._fail_request(s.state.req_id, result.adapter_errors[adapter_id], result)
        return kept

    def _fail_request(self, req_id: str, error: str, result: StepResult) -> None:
        result.request_errors[req_id] = error
        self._drop_request(req_id)
        self.failed_req_ids.add(req_id)

    def _forward(self, step: StepBatch, lora_modules: frozenset[str]) -> torch.Tensor:
        """float32 logits [len(step.sampled), vocab] of the step's sampled requests, with
        LoRA on the projections `lora_modules`."""
        num_sampled = len(step.sampled)
        if step.graph_kind:
            logits = self.graphs.replay(step.graph_kind, step.graph_size,
                                        lora_modules if step.any_lora else NO_MODULES)
            if step.graph_kind != DECODE or num_sampled == step.num_tokens:
                return logits[:num_sampled]  # a mixed graph's rows are the sampled ones
            return logits.index_select(0, self.inputs.logits_indices(num_sampled))
        batch = self.inputs.forward_batch(
            step.num_tokens, step.num_reqs, step.num_decode, step.num_segs,
            step.max_query_len, step.max_context_len, step.any_lora, num_sampled, lora_modules)
        return self.model.forward(batch, self.pool)

    def _capture(self, modules: frozenset) -> None:
        """Captures every bucket of both kinds for one LoRA set, over padding inputs (the
        captures read and write no request's pages)."""
        start = time.perf_counter()
        self.inputs.write_padding()
        if self._graph_logits is None:  # outside every graph's pool: shared by all of them
            rows = max(self.inputs.max_num_reqs, self.graphs.max_batch)
            self._graph_logits = torch.empty(rows, self.config.model.vocab_size,
                                             dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for kind, size in self.graphs.shapes():
                # One eager run first: kernels loaded, cuBLAS set up for this shape.
                self._padded_forward(kind, size, modules)
                torch.cuda.synchronize(self.device)
                with self.graphs.recording(kind, size, modules) as out:
                    logits = self._padded_forward(kind, size, modules)
                    out["logits"] = self._into_shared_logits(logits)
                del logits  # its blocks go back to the graphs' pool, for the next capture
        torch.cuda.synchronize(self.device)
        self.graphs.captured(modules, time.perf_counter() - start)

    def _into_shared_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Inside a capture: the graph copies its logits into rows of the one buffer all
        graphs share, so its own logits tensor is freed after the capture and no graph keeps
        memory of its own past its capture (at 256 running requests, the mixed graphs'
        logits of each LoRA set alone took 1.5 GB). Safe because replays are serial and
        each replay's logits are sampled before the next is queued."""
        buf = self._graph_logits
        rows, cols = logits.shape
        if rows > buf.shape[0] or cols != buf.shape[1]:
            return logits  # a shape the buffer was not made for: the graph keeps its own
        buf[:rows].copy_(logits)
        return buf[:rows]

    def _padded_forward(self, kind: str, size, lora_modules: frozenset) -> torch.Tensor:
        """The step a graph captures. Decode: `size` requests, logits of every row. Mixed,
        size (D, S): D decode rows, then S prefill rows of the graph's prefill requests (each
        one LoRA segment; padding is empty), logits of max_num_seqs rows."""
        inputs, any_lora = self.inputs, bool(lora_modules)
        if kind == DECODE:
            batch = inputs.forward_batch(size, size, size, 0, 1, inputs.row_width, any_lora,
                                         None, lora_modules)
        else:
            d, s = size
            p = self.graphs.mixed_prefill_reqs(s)
            batch = inputs.forward_batch(d + s, d + p, d, p, s, inputs.row_width, any_lora,
                                         inputs.max_num_reqs, lora_modules)
        return self.model.forward(batch, self.pool)
