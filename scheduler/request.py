"""A request as the scheduler sees it: token ids, progress, pages, adapter."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from slora.common.sampling_params import SamplingParams
from slora.scheduler.adapter_residency import AdapterRef

NO_DEADLINE = math.inf
"""Request.deadline_s of a request whose client set no deadline."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    """A stop token (or end of sequence)."""
    LENGTH = "length"
    """max_new_tokens, or the context reached max_model_len."""
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterRef | None
    eos_token_ids: tuple[int, ...] = ()
    arrival: int = 0
    """Order of arrival; earlier requests are served first and preempted last."""
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the pool (or are being computed by the step in flight)."""
    page_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_failed_steps: int = 0
    """Whole steps that failed on the worker with this request in them (it is retried
    once)."""
    num_output_placeholders: int = 0
    """Tokens a step in flight will sample for this request, not yet received: the
    planner schedules step N+1 before step N's results are back."""
    deadline_s: float = NO_DEADLINE
    """When its client stops waiting, in time.monotonic() seconds (scheduler/deadlines.py)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return self.num_tokens + self.num_output_placeholders

    @property
    def will_finish(self) -> bool:
        """True when the tokens in flight already take it to its length limit."""
        num_outputs = len(self.output_token_ids) + self.num_output_placeholders
        return num_outputs >= self.sampling.max_new_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def adapter_id(self) -> str | None:
        return None if self.adapter is None else self.adapter.adapter_id


@dataclass
class RequestOutput:
    """What one step produced for one request. Plain values: it crosses processes."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str = ""
