"""Dataclass <-> protobuf twins of the messages that cross processes. No logic beyond
copying fields (and filling the documented defaults of unset proto fields)."""
from __future__ import annotations

from slora.common.sampling_params import SamplingParams
from slora.protos import step as dc
from slora.v1 import common_pb2, worker_pb2

DEFAULT_MAX_NEW_TOKENS = 16


def sampling_to_proto(sp: SamplingParams, stop: list[str] | None = None) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_k=sp.top_k,
        top_p=sp.top_p, stop_token_ids=list(sp.stop_token_ids), stop=stop or [],
        ignore_eos=sp.ignore_eos)
    if sp.seed is not None:
        msg.seed = sp.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError naming the bad field."""
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p or 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos)


def step_command_to_proto(cmd: dc.StepCommand) -> worker_pb2.StepCommand:
    return worker_pb2.StepCommand(
        step_id=cmd.step_id,
        new_requests=[worker_pb2.NewRequest(
            request_id=r.req_id, token_ids=r.token_ids, num_prompt_tokens=r.num_prompt_tokens,
            page_ids=r.page_ids, num_scheduled_tokens=r.num_scheduled_tokens,
            adapter_slot=r.adapter_slot, sampling=sampling_to_proto(r.sampling))
            for r in cmd.new_requests],
        running_requests=[worker_pb2.RunningRequest(
            request_id=r.req_id, new_page_ids=r.new_page_ids,
            num_computed_tokens=r.num_computed_tokens,
            num_scheduled_tokens=r.num_scheduled_tokens) for r in cmd.running_requests],
        finished_request_ids=cmd.finished_req_ids,
        adapter_evictions=cmd.adapter_evictions,
        adapter_loads=[worker_pb2.AdapterLoad(adapter_id=l.adapter_id, path=l.path,
                                              slot=l.slot, page_ids=l.page_ids)
                       for l in cmd.adapter_loads])


def step_command_from_proto(msg: worker_pb2.StepCommand) -> dc.StepCommand:
    return dc.StepCommand(
        step_id=msg.step_id,
        new_requests=[dc.NewRequest(
            r.request_id, list(r.token_ids), r.num_prompt_tokens, list(r.page_ids),
            r.num_scheduled_tokens, r.adapter_slot, sampling_from_proto(r.sampling))
            for r in msg.new_requests],
        running_requests=[dc.RunningRequest(
            r.request_id, list(r.new_page_ids), r.num_computed_tokens, r.num_scheduled_tokens)
            for r in msg.running_requests],
        finished_req_ids=list(msg.finished_request_ids),
        adapter_evictions=list(msg.adapter_evictions),
        adapter_loads=[dc.AdapterLoad(l.adapter_id, l.path, l.slot, list(l.page_ids))
                       for l in msg.adapter_loads])


def step_result_to_proto(result: dc.StepResult) -> worker_pb2.StepResult:
    return worker_pb2.StepResult(
        step_id=result.step_id, request_ids=result.req_ids, token_ids=result.token_ids,
        logprobs=result.logprobs, step_time_s=result.step_time_s, error=result.error,
        request_errors=[worker_pb2.RequestError(request_id=r, error=e)
                        for r, e in result.request_errors.items()],
        adapter_errors=[worker_pb2.AdapterLoadError(adapter_id=a, error=e)
                        for a, e in result.adapter_errors.items()])


def step_result_from_proto(msg: worker_pb2.StepResult) -> dc.StepResult:
    return dc.StepResult(msg.step_id, list(msg.request_ids), list(msg.token_ids),
                         list(msg.logprobs), msg.step_time_s, msg.error,
                         {r.request_id: r.error for r in msg.request_errors},
                         {a.adapter_id: a.error for a in msg.adapter_errors})
