"""The step planner: continuous batching at the iteration level over the unified pool.

Every step has a token budget. Running requests come first, in arrival order: a decoding
request takes one token, a request part-way through its prompt takes the next chunk. Then
waiting requests are admitted in arrival order, each only when its adapter can be made
resident and the pool has a page for every token of its prompt; its first chunk is
scheduled at once. There is no separate prefill phase: prefill chunks and decode tokens
share one step. When a running request needs a page and none is free, unreferenced
adapters are evicted first, then the most recently arrived running request is preempted:
its pages are freed and it waits again at the head of the queue, to be recomputed from its
prompt and the tokens it already produced (which it keeps). Finished and cancelled
requests free their pages at once; the worker drops their state at the next step.
"""
from __future__ import annotations

import collections
import itertools

from slora.common.config import EngineConfig
from slora.common.sampling_params import SamplingParams
from slora.protos.step import (
    NO_ADAPTER_SLOT, NewRequest, RunningRequest, StepCommand, StepResult,
)
from slora.scheduler.adapter_residency import AdapterRef, AdapterResidency
from slora.scheduler.admission import check_request
from slora.scheduler.page_table import PageOwner, PageTable
from slora.scheduler.request import FinishReason, Request, RequestOutput, RequestStatus


PREFETCH_DEPTH = 8
"""Queued requests whose adapters are loaded ahead of their admission."""


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.page_table = PageTable(config.pool.num_pages)
        self.residency = AdapterResidency(config.pool.num_adapter_slots, self.page_table)
        self.requests: dict[str, Request] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.freed_req_ids: list[str] = []
        """Requests the worker still holds state for, to drop at the next step."""
        self._arrivals = itertools.count()
        self._step_ids = itertools.count()
        self.num_preemptions = 0

    # -- requests in and out --------------------------------------------------------------

    def submit(self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
               adapter: AdapterRef | None = None) -> Request:
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        check_request(self.config, prompt_token_ids, sampling, len(self.waiting))
        req = Request(req_id, list(prompt_token_ids), sampling, adapter,
                      eos_token_ids=self.config.model.eos_token_ids,
                      arrival=next(self._arrivals))
        self.requests[req_id] = req
        self.waiting.append(req)
        return req

    def cancel(self, req_id: str) -> RequestOutput | None:
        """Cancels a waiting or running request and frees its pages now."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        self._finish(req, FinishReason.CANCELLED)
        return self._output(req, [], [])

    def abort_adapter(self, adapter_id: str, error: str) -> list[RequestOutput]:
        """Ends every request of an adapter the worker could not load."""
        outs = self.abort_requests(
            [r.req_id for r in self.requests.values() if r.adapter_id == adapter_id], error)
        self.residency.drop(adapter_id, StepCommand(step_id=-1))
        return outs

    def abort_requests(self, req_ids: list[str], error: str) -> list[RequestOutput]:
        """Ends these requests with `error` (the step that ran them failed)."""
        outs = []
        for req in [self.requests[r] for r in req_ids if r in self.requests]:
            self._finish(req, FinishReason.ERROR)
            out = self._output(req, [], [])
            out.error = error
            outs.append(out)
        return outs

    def forget_worker_state(self) -> None:
        """The worker holds nothing any more (it dropped its state after a failed step, or
        a new Steps stream starts it empty): running requests go back to the queue, to be
        recomputed from their tokens, and no adapter is resident."""
        while self.running:
            self._preempt(self.running.pop())
        self.residency.make_room(self.page_table.num_pages, StepCommand(step_id=-1))
        self.freed_req_ids = []

    def drop_adapter(self, adapter_id: str) -> bool:
        """Evicts an adapter whose registration was deleted; False, changing nothing, while
        a waiting or running request still uses it."""
        if any(r.adapter_id == adapter_id for r in self.requests.values()):
            return False
        self.residency.drop(adapter_id, StepCommand(step_id=-1))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- planning -------------------------------------------------------------------------

    def schedule(self) -> StepCommand:
        cmd = StepCommand(step_id=next(self._step_ids))
        budget = self.config.scheduler.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens_with_placeholders - req.num_computed_tokens, budget)
            if num_new == 0 or req.will_finish or \
                    req.num_tokens_with_placeholders >= self.config.scheduler.max_model_len:
                i += 1
                continue
            while self.page_table.num_free < num_new:
                if self.residency.make_room(num_new, cmd):
                    break
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            new_page_ids = self.page_table.allocate(num_new, PageOwner("kv", req.req_id))
            cmd.running_requests.append(RunningRequest(
                req.req_id, new_page_ids, req.num_computed_tokens, num_new))
            req.page_ids += new_page_ids
            req.num_computed_tokens += num_new
            if req.num_computed_tokens == req.num_tokens_with_placeholders:
                req.num_output_placeholders += 1
            budget -= num_new
            i += 1

        max_num_seqs = self.config.scheduler.max_num_seqs
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < max_num_seqs):
            req = self.waiting[0]
            if self._load_ahead(req, cmd) or not self._admit(req, budget, cmd):
                break
            self.waiting.popleft()
            self.running.append(req)
            budget -= req.num_computed_tokens

        self._prefetch_adapters(cmd)
        cmd.finished_req_ids, self.freed_req_ids = self.freed_req_ids, []
        return cmd

    def _prefetch_adapters(self, cmd: StepCommand) -> None:
        """Loads the adapters of the next queued requests while there is room to spare:
        pages for the queue head's prompt and a decode token per running request stay
        free, and no adapter those requests need is evicted for another."""
        if not self.waiting:
            return
        keep_free = self.waiting[0].num_tokens + len(self.running)
        ahead = [r.adapter for r in itertools.islice(self.waiting, PREFETCH_DEPTH)
                 if r.adapter is not None]
        keep = frozenset(a.adapter_id for a in ahead)
        for ref in ahead:
            self.residency.prefetch(ref, cmd, keep_free, keep)

    def _load_ahead(self, req: Request, cmd: StepCommand) -> bool:
        """True when the head of the queue waits one step for its adapter: the adapter is
        not resident, this step has other requests to run, and the adapter's load can start
        now (as a prefetch, behind this step's forward pass). Without it, a request that
        arrives while the batch has room is admitted in the very step that loads its
        adapter, and that step waits for the copy: below max_num_seqs nothing ever waits in
        the queue long enough to be prefetched (issue 28: 0 of 361 loads came ahead at 256
        running requests). A step with no running request (an idle server, or a burst's
        first step) admits at once: there is nothing to overlap, and a burst is admitted
        together. After the first deferral the queue's next PREFETCH_DEPTH adapters are
        prefetched too, so the next step admits them all."""
        ref = req.adapter
        if ref is None or ref.adapter_id in self.residency.resident or not cmd.running_requests:
            return False
        keep = frozenset(r.adapter.adapter_id for r in itertools.islice(self.waiting,
                                                                        PREFETCH_DEPTH)
                         if r.adapter is not None)
        return self.residency.prefetch(ref, cmd, req.num_tokens + len(self.running), keep)

    def _admit(self, req: Request, budget: int, cmd: StepCommand) -> bool:
        """Admits the head of the queue if its adapter and all its tokens fit."""
        num_tokens = req.num_tokens
        slot = NO_ADAPTER_SLOT
        if req.adapter is not None:
            slot = self.residency.acquire(req.adapter, cmd, reserve_pages=num_tokens)
            if slot is None:
                return False
        elif not self.residency.make_room(num_tokens, cmd):
            return False
        num_new = min(num_tokens, budget)
        req.page_ids = self.page_table.allocate(num_new, PageOwner("kv", req.req_id))
        req.num_computed_tokens = num_new
        if num_new == num_tokens:
            req.num_output_placeholders = 1
        req.status = RequestStatus.RUNNING
        cmd.new_requests.append(NewRequest(
            req.req_id, req.all_token_ids, len(req.prompt_token_ids), list(req.page_ids),
            num_new, slot, req.sampling))
        return True

    def _release_pages(self, req: Request) -> None:
        if req.status is RequestStatus.RUNNING:
            self.page_table.free(req.page_ids, PageOwner("kv", req.req_id))
            if req.adapter is not None:
                self.residency.release(req.adapter.adapter_id)
            self.freed_req_ids.append(req.req_id)
        req.page_ids = []
        req.num_computed_tokens = 0
        req.num_output_placeholders = 0

    def _preempt(self, req: Request) -> None:
        # The worker drops its state (via freed_req_ids, in this very step) before it sees
        # the request again as new.
        self._release_pages(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self._release_pages(req)
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.req_id]

    # -- results --------------------------------------------------------------------------

    def update(self, result: StepResult) -> list[RequestOutput]:
        outputs = self._apply_failures(result)
        max_len = self.config.scheduler.max_model_len
        for req_id, token_id, logprob in zip(result.req_ids, result.token_ids,
                                             result.logprobs):
            req = self.requests.get(req_id)
            if req is None or req.num_output_placeholders == 0:
                continue  # finished, cancelled or preempted while the step ran
            req.num_output_placeholders -= 1
            req.output_token_ids.append(token_id)
            req.output_logprobs.append(logprob)
            sp = req.sampling
            reason = None
            if token_id in sp.stop_token_ids or (
                    not sp.ignore_eos and token_id in req.eos_token_ids):
                reason = FinishReason.STOP
            elif len(req.output_token_ids) >= sp.max_new_tokens or req.num_tokens >= max_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(req, reason)
            outputs.append(self._output(req, [token_id], [logprob]))
        return outputs

    def _apply_failures(self, result: StepResult) -> list[RequestOutput]:
        """Requests that failed alone end with their own error; an adapter that did not load
        ends its requests (its slot is already empty on the worker, nothing else changed)."""
        outputs = []
        for adapter_id, error in result.adapter_errors.items():
            outputs += self.abort_adapter(adapter_id, error)
        for req_id, error in result.request_errors.items():
            req = self.requests.get(req_id)
            if req is not None:
                self._finish(req, FinishReason.ERROR)
                out = self._output(req, [], [])
                out.error = error
                outputs.append(out)
        return outputs

    @staticmethod
    def _output(req: Request, token_ids: list[int], logprobs: list[float]) -> RequestOutput:
        return RequestOutput(
            req.req_id, token_ids, logprobs, req.status is RequestStatus.FINISHED,
            req.finish_reason, len(req.prompt_token_ids), len(req.output_token_ids))

    # -- accounting -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        usage = self.page_table.usage()
        return {
            "pages_free": usage["free"], "pages_kv": usage["kv"],
            "pages_adapter": usage["adapter"], "pages_total": usage["total"],
            "num_waiting": len(self.waiting), "num_running": len(self.running),
            "adapters_resident": len(self.residency.resident),
            "adapter_loads": self.residency.num_loads,
            "adapter_evictions": self.residency.num_evictions,
            "adapter_prefetches": self.residency.num_prefetches,
            "preemptions": self.num_preemptions,
            "max_num_seqs": self.config.scheduler.max_num_seqs,
        }

    def check_invariants(self) -> None:
        """No page owned twice; every held page belongs to a running request or a resident
        adapter; adapter references match the running requests."""
        owners = self.residency.owners()
        for req in self.running:
            assert req.status is RequestStatus.RUNNING
            assert len(req.page_ids) == req.num_computed_tokens
            owners[PageOwner("kv", req.req_id)] = req.page_ids
        for req in self.waiting:
            assert req.status is RequestStatus.WAITING and not req.page_ids
        self.page_table.check(owners)
        refs = collections.Counter(r.adapter_id for r in self.running if r.adapter is not None)
        for adapter_id, entry in self.residency.resident.items():
            assert entry.num_refs == refs.get(adapter_id, 0), (
                f"adapter {adapter_id!r}: {entry.num_refs} refs, "
                f"{refs.get(adapter_id, 0)} running requests")
        assert refs.keys() <= self.residency.resident.keys(), "a running adapter is not resident"
        idle = sum(len(e.page_ids) for e in self.residency.resident.values() if e.num_refs == 0)
        assert self.residency.num_idle_pages == idle, (
            f"{self.residency.num_idle_pages} idle adapter pages counted, {idle} held")
