"""The step: one command from scheduler to worker, one result back. No logic here.

Who owns each form of the batch:
* scheduler/ plans on the CPU (requests, page ids, adapter slots) and emits a StepCommand;
* the wire carries it as slora.v1.StepCommand (protos/slora/v1/worker.proto), or in-process
  the same dataclass is handed over directly;
* worker/ turns it into GPU tensors (kernels/backend.py: LoraBatch, AttentionBatch) and
  keeps per-request state (token ids, pages) so a running request costs only its new pages.

Full state once, then the difference: a request the worker does not hold comes as a
NewRequest with all its token ids; a running one as a RunningRequest with only new page
ids. `finished_req_ids` (finished, cancelled or preempted) lists the requests whose state
the worker drops before running the step; their pages may be reused in the same step.
Within a step the worker applies, in order: finished_req_ids, adapter_evictions,
adapter_loads, then runs the requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from slora.common.sampling_params import SamplingParams

NO_ADAPTER_SLOT = -1


@dataclass
class AdapterLoad:
    adapter_id: str
    path: str
    """Where the worker's host cache reads the PEFT folder from."""
    slot: int
    page_ids: list[int]
    """Pages for the adapter's rows: for each targeted module in the model's lora_modules
    order, for each rank-row, that module's pages-per-row pages."""


@dataclass
class NewRequest:
    req_id: str
    token_ids: list[int]
    """Every known token: the prompt, then outputs kept from before a preemption."""
    num_prompt_tokens: int
    page_ids: list[int]
    """Pages of the tokens computed this step, one per token, in position order."""
    num_scheduled_tokens: int
    """Tokens computed this step, from position 0."""
    adapter_slot: int
    sampling: SamplingParams


@dataclass
class RunningRequest:
    req_id: str
    new_page_ids: list[int]
    """Pages of this step's tokens."""
    num_computed_tokens: int
    """Tokens already in the pool before this step (a check for the worker)."""
    num_scheduled_tokens: int


@dataclass
class StepCommand:
    step_id: int
    new_requests: list[NewRequest] = field(default_factory=list)
    running_requests: list[RunningRequest] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    adapter_evictions: list[int] = field(default_factory=list)
    """Slots whose adapters leave the pool."""
    adapter_loads: list[AdapterLoad] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return (sum(r.num_scheduled_tokens for r in self.new_requests)
                + sum(r.num_scheduled_tokens for r in self.running_requests))


@dataclass
class StepResult:
    """Plain lists, not tensors: this crosses processes."""

    step_id: int
    req_ids: list[str] = field(default_factory=list)
    """Requests that sampled a token this step (their scheduled tokens reached the end)."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    step_time_s: float = 0.0
    error: str = ""
    """Set when the whole step failed (a bug, a kernel error: the worker then holds no
    request and no adapter). A failure of one request or one adapter is not this."""
    request_errors: dict[str, str] = field(default_factory=dict)
    """req_id -> error, for requests that failed alone this step (a sampling error, or
    their adapter did not load): the worker dropped their state; the step's other requests
    ran. The scheduler ends each with its own message."""
    adapter_errors: dict[str, str] = field(default_factory=dict)
    """adapter_id -> error, for adapters whose load failed this step: their slots are
    empty on the worker, and no other slot was touched."""
