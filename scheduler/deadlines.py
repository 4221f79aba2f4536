"""Deadlines, early abort and the retry hint: when will a request finish?

Early abort (the paper's, section 5). A request whose client deadline cannot be met would
only waste pages and steps and then time out. So the scheduler refuses it at submission
(DEADLINE_EXCEEDED, "early abort: ...") when its estimated finish is past its deadline, and
drops a waiting request from the queue (same status) as soon as the estimate says it will
miss. A running request is left alone: it stops within one step when its deadline passes,
because gRPC cancels its call and the cancel frees its pages at once.

The estimator. Continuous batching, idealised: at most S = max_num_seqs requests run at
once, each gets one token a step, and a step takes T seconds, the measured step time (an
exponential moving average of each step as the driver sees it: result received minus the
later of command sent and previous result received, so two commands in flight are not
counted twice). A request owes ceil(uncomputed tokens / token budget) prefill steps, and one
decode step per output token it may still produce (max_new_tokens minus those produced,
capped by max_model_len), the first coming with its last prefill chunk. Simulate: S slots,
each free once its running request has run the steps it owes; waiting requests, in queue
order, each take the slot free first. A request's estimated finish is now + T x (the step
its slot frees + the steps it owes).
* It over-estimates a request that stops early at an end-of-sequence token or stop string:
  such a request may be refused although it would have made it. We prefer that to admitting
  requests that need luck; a client that expects short answers sets a small max_new_tokens.
* It under-estimates when pages rather than slots limit the batch, or when requests are
  preempted; T grows with the batch, which the moving average follows within a few steps.
* Until a step has been measured there is no estimate, and nothing is refused.

The retry hint. A full queue answers RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`: the
time until the first slot frees, when the queue's head is admitted and a place opens,
within [MIN_PUSHBACK_MS, MAX_PUSHBACK_MS]; DEFAULT_PUSHBACK_MS before any measurement.
"""
from __future__ import annotations

import heapq
import math

from slora.scheduler.planner import Scheduler
from slora.scheduler.request import Request

NOT_MEASURED = 0.0
EMA_WEIGHT = 0.2
"""Weight of the newest step in the moving average of step time."""
REFRESH_INTERVAL_S = 0.05
"""How stale the simulation may get: it costs O(queue length) to redo."""
MIN_PUSHBACK_MS, DEFAULT_PUSHBACK_MS, MAX_PUSHBACK_MS = 50, 1000, 30_000


class StepTimer:
    """Moving average of the worker's step time, seen from the scheduler."""

    def __init__(self):
        self.seconds_per_step = NOT_MEASURED
        self._last_result_at = -math.inf

    def on_result(self, sent_at: float, received_at: float, ran_requests: bool) -> float:
        """Records the step whose command left at `sent_at` and whose result came back at
        `received_at` (monotonic seconds); returns its duration."""
        seconds = received_at - max(sent_at, self._last_result_at)
        self._last_result_at = received_at
        if ran_requests:  # steps that only free state take no compute
            self.seconds_per_step = seconds if self.seconds_per_step == NOT_MEASURED else (
                EMA_WEIGHT * seconds + (1 - EMA_WEIGHT) * self.seconds_per_step)
        return seconds


class FinishEstimator:
    def __init__(self, planner: Scheduler, timer: StepTimer):
        self.planner = planner
        self.timer = timer
        self._slots: list[int] = []
        """Heap: the step at which each batch slot frees, after the queue as simulated."""
        self._first_free_step = 0
        self._refreshed_at = -math.inf

    def steps_owed(self, req: Request) -> int:
        cfg = self.planner.config.scheduler
        outputs = max(req.sampling.max_new_tokens - len(req.output_token_ids), 0)
        outputs = min(outputs, cfg.max_model_len - req.num_tokens)
        uncomputed = req.num_tokens - req.num_computed_tokens
        prefill = -(-uncomputed // cfg.max_num_batched_tokens) if uncomputed > 0 else 0
        return max(prefill + outputs - (1 if prefill else 0), 1)

    def refresh(self, now: float, force: bool = False) -> list[Request]:
        """Redoes the simulation if it is stale; returns the waiting requests that will miss
        their deadlines (left out of the simulation: the caller aborts them)."""
        if not force and now - self._refreshed_at < REFRESH_INTERVAL_S:
            return []
        self._refreshed_at = now
        num_slots = self.planner.config.scheduler.max_num_seqs
        slots = [self.steps_owed(r) for r in self.planner.running]
        slots += [0] * max(num_slots - len(slots), 0)
        heapq.heapify(slots)
        self._first_free_step = slots[0] if slots else 0
        step_s = self.timer.seconds_per_step
        hopeless = []
        for req in self.planner.waiting:
            start = heapq.heappop(slots)
            end = start + self.steps_owed(req)
            if step_s != NOT_MEASURED and now + end * step_s > req.deadline_s:
                hopeless.append(req)
                end = start
            heapq.heappush(slots, end)
        self._slots = slots
        return hopeless

    def estimate_new(self, req: Request, now: float) -> float:
        """Seconds until `req`, about to join the end of the queue, would finish; 0.0 when
        not measured yet. Counts it in the simulation (the next submission queues behind
        it). Call `refresh` first."""
        start = heapq.heappop(self._slots)
        end = start + self.steps_owed(req)
        heapq.heappush(self._slots, end)
        return end * self.timer.seconds_per_step

    def forget(self) -> None:
        """A request counted by estimate_new was not queued after all: redo the simulation
        at the next refresh."""
        self._refreshed_at = -math.inf

    def retry_pushback_ms(self) -> int:
        if self.timer.seconds_per_step == NOT_MEASURED:
            return DEFAULT_PUSHBACK_MS
        ms = round(1000 * self._first_free_step * self.timer.seconds_per_step)
        return min(max(ms, MIN_PUSHBACK_MS), MAX_PUSHBACK_MS)
