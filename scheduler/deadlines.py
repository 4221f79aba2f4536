"""Deadlines, early abort and the retry hint: when will a request finish?

Early abort (the paper's, section 5). A request whose client deadline cannot be met would
only waste pages and steps and then time out. So the scheduler refuses it at submission
(DEADLINE_EXCEEDED, "early abort: ...") when its estimated finish is past its deadline, and
drops a waiting request from the queue (same status) as soon as the estimate says it will
miss. A running request is left alone: it stops within one step when its deadline passes,
because gRPC cancels its call and the cancel frees its pages at once.

The estimator. Continuous batching, idealised: at most S = max_num_seqs requests run at
once, each gets one token a step. A request owes ceil(uncomputed tokens / token budget)
prefill steps, and one decode step per output token it may still produce (max_new_tokens
minus those produced, capped by max_model_len), the first coming with its last prefill
chunk. Simulate: S slots, each free once its running request has run the steps it owes;
waiting requests, in queue order, each take the slot free first. What a step costs comes
from step_cost.py (a fit on each step's prefill and decode tokens, not an average of whole
steps, so one long prompt does not make every later step look long): a step of the
simulation decodes B = min(S, running + waiting) requests, and every prompt token still to
compute, of the requests ahead in the queue and the request's own, adds the fitted cost of
a prefill token. A request's estimated finish is now + (the step its slot frees + the
steps it owes) x seconds(decode B) + (prompt tokens up to and including its own) x
seconds per prefill token.
* It over-estimates a request that stops early at an end-of-sequence token or stop string:
  such a request may be refused although it would have made it. We prefer that to admitting
  requests that need luck; a client that expects short answers sets a small max_new_tokens.
* It under-estimates when pages rather than slots limit the batch, or when requests are
  preempted; the fit follows the steps as they come.
* Until a step has been measured there is no estimate, and nothing is refused.

The retry hint. A full queue answers RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`: the
time until the first slot frees, when the queue's head is admitted and a place opens,
within [MIN_PUSHBACK_MS, MAX_PUSHBACK_MS]; DEFAULT_PUSHBACK_MS before any measurement.
"""
from __future__ import annotations

import heapq
import math

from slora.protos.step import StepCommand
from slora.scheduler.planner import Scheduler
from slora.scheduler.request import Request
from slora.scheduler.step_cost import StepCostModel, step_features

NOT_MEASURED = 0.0
EMA_WEIGHT = 0.2
"""Weight of the newest step in the moving average of step time (stats only)."""
REFRESH_INTERVAL_S = 0.05
"""How stale the simulation may get: it costs O(queue length) to redo."""
MIN_PUSHBACK_MS, DEFAULT_PUSHBACK_MS, MAX_PUSHBACK_MS = 50, 1000, 30_000


class StepTimer:
    """The worker's step times, seen from the scheduler: the cost model the estimates use,
    and a moving average of steps as they come (for stats)."""

    def __init__(self):
        self.cost = StepCostModel()
        self.seconds_per_step = NOT_MEASURED
        self._last_result_at = -math.inf

    def started_at(self, sent_at: float) -> float:
        """When the worker began a command sent at `sent_at` that is first in flight."""
        return max(sent_at, self._last_result_at)

    def on_result(self, sent_at: float, received_at: float, cmd: StepCommand) -> float:
        """Records the step `cmd`, whose command left at `sent_at` and whose result came
        back at `received_at` (monotonic seconds); returns its duration."""
        seconds = received_at - self.started_at(sent_at)
        self._last_result_at = received_at
        num_prefill, num_decode = step_features(cmd)
        if num_prefill + num_decode:  # steps that only free state take no compute
            self.cost.add(num_prefill, num_decode, seconds)
            self.seconds_per_step = seconds if self.seconds_per_step == NOT_MEASURED else (
                EMA_WEIGHT * seconds + (1 - EMA_WEIGHT) * self.seconds_per_step)
        return seconds

    def expected_s(self, cmd: StepCommand) -> float:
        """What the model says `cmd` takes; NOT_MEASURED before any step."""
        return self.cost.predict(*step_features(cmd)) if self.cost.measured else NOT_MEASURED


class FinishEstimator:
    def __init__(self, planner: Scheduler, timer: StepTimer):
        self.planner = planner
        self.timer = timer
        self._slots: list[int] = []
        """Heap: the step at which each batch slot frees, after the queue as simulated."""
        self._first_free_step = 0
        self._step_s = NOT_MEASURED
        self._prefill_token_s = 0.0
        self._prefill_tokens = 0
        """Prompt tokens to compute before the end of the queue, as simulated."""
        self._refreshed_at = -math.inf

    def steps_owed(self, req: Request) -> int:
        cfg = self.planner.config.scheduler
        outputs = max(req.sampling.max_new_tokens - len(req.output_token_ids), 0)
        outputs = min(outputs, cfg.max_model_len - req.num_tokens)
        uncomputed = req.num_tokens - req.num_computed_tokens
        prefill = -(-uncomputed // cfg.max_num_batched_tokens) if uncomputed > 0 else 0
        return max(prefill + outputs - (1 if prefill else 0), 1)

    @staticmethod
    def uncomputed(req: Request) -> int:
        return max(req.num_tokens - req.num_computed_tokens, 0)

    def refresh(self, now: float, force: bool = False) -> list[Request]:
        """Redoes the simulation if it is stale; returns the waiting requests that will miss
        their deadlines (left out of the simulation: the caller aborts them)."""
        if not force and now - self._refreshed_at < REFRESH_INTERVAL_S:
            return []
        self._refreshed_at = now
        planner, cost = self.planner, self.timer.cost
        num_slots = planner.config.scheduler.max_num_seqs
        slots = [self.steps_owed(r) for r in planner.running]
        slots += [0] * max(num_slots - len(slots), 0)
        heapq.heapify(slots)
        self._first_free_step = slots[0] if slots else 0
        batch = min(num_slots, len(planner.running) + len(planner.waiting) + 1)
        self._step_s = cost.predict(0, batch) if cost.measured else NOT_MEASURED
        self._prefill_token_s = cost.prefill_seconds_per_token() if cost.measured else 0.0
        self._prefill_tokens = sum(self.uncomputed(r) for r in planner.running)
        hopeless = []
        for req in planner.waiting:
            start = heapq.heappop(slots)
            end = start + self.steps_owed(req)
            prefill_tokens = self._prefill_tokens + self.uncomputed(req)
            if cost.measured and now + self._seconds(end, prefill_tokens) > req.deadline_s:
                hopeless.append(req)
                end = start
            else:
                self._prefill_tokens = prefill_tokens
            heapq.heappush(slots, end)
        self._slots = slots
        return hopeless

    def _seconds(self, num_steps: int, num_prefill_tokens: int) -> float:
        return num_steps * self._step_s + num_prefill_tokens * self._prefill_token_s

    def estimate_new(self, req: Request, now: float) -> float:
        """Seconds until `req`, about to join the end of the queue, would finish; 0.0 when
        not measured yet. Counts it in the simulation (the next submission queues behind
        it). Call `refresh` first."""
        start = heapq.heappop(self._slots)
        end = start + self.steps_owed(req)
        heapq.heappush(self._slots, end)
        self._prefill_tokens += self.uncomputed(req)
        return self._seconds(end, self._prefill_tokens)

    def forget(self) -> None:
        """A request counted by estimate_new was not queued after all: redo the simulation
        at the next refresh."""
        self._refreshed_at = -math.inf

    def step_seconds(self) -> float:
        """The simulation's seconds per decode step (NOT_MEASURED before any step)."""
        return self._step_s

    def retry_pushback_ms(self) -> int:
        if self._step_s == NOT_MEASURED:
            return DEFAULT_PUSHBACK_MS
        ms = round(1000 * self._first_free_step * self._step_s)
        return min(max(ms, MIN_PUSHBACK_MS), MAX_PUSHBACK_MS)
