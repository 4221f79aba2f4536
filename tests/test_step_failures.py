"""A step that fails comes back as a StepResult with `error`, the same object in-process and
(protos/convert.py) on the wire; the worker then holds no request and no adapter, and the
next command runs. An adapter that cannot be read fails alone: it is named in
`adapter_errors` and the step's requests run."""
from __future__ import annotations

from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.models.registry import dummy_model_config
from slora.protos.convert import step_result_from_proto, step_result_to_proto
from slora.protos.step import AdapterLoad, NewRequest, RunningRequest, StepCommand
from slora.worker.executor import Worker


def make_worker() -> Worker:
    config = EngineConfig(model=dummy_model_config("dummy-tiny"),
                          pool=PoolConfig(num_pages=1024, max_adapter_slots=2, max_lora_rank=8),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                    max_model_len=64))
    return Worker(config, None, "torch")


def new_request(req_id: str, first_page: int) -> NewRequest:
    return NewRequest(req_id, [5, 6, 7], 3, [first_page, first_page + 1, first_page + 2], 3, -1,
                      SamplingParams(max_new_tokens=4, ignore_eos=True))


def test_a_failed_step_comes_back_in_its_result_and_the_worker_starts_empty():
    worker = make_worker()
    ok = worker.execute(StepCommand(0, new_requests=[new_request("a", 0)]))
    assert not ok.error and ok.req_ids == ["a"]
    # A running request the worker does not hold (a scheduler out of step with it).
    failed = worker.execute(StepCommand(1, running_requests=[RunningRequest("b", [9], 3, 1)]))
    assert failed.step_id == 1 and failed.req_ids == []
    assert failed.error.startswith("step 1 failed on the worker: KeyError"), failed.error
    assert "'b'" in failed.error
    assert worker.requests == {}  # "a" dropped too: the scheduler recomputes it
    wire = step_result_from_proto(step_result_to_proto(failed))
    assert wire.error == failed.error
    again = worker.execute(StepCommand(2, new_requests=[new_request("a", 0)]))
    assert not again.error and again.token_ids == ok.token_ids


def test_an_adapter_that_cannot_be_read_names_itself_and_the_step_runs(tmp_path):
    worker = make_worker()
    first = worker.execute(StepCommand(0, new_requests=[new_request("a", 0)]))
    missing = str(tmp_path / "gone")
    cmd = StepCommand(1, running_requests=[RunningRequest("a", [3], 3, 1)],
                      adapter_loads=[AdapterLoad("acme", missing, 0, list(range(100, 108)))])
    result = worker.execute(cmd)
    assert not result.error and result.req_ids == ["a"] and len(first.token_ids) == 1
    assert list(result.adapter_errors) == ["acme"] and "acme" in result.adapter_errors["acme"]
    assert "a" in worker.requests  # nothing else dropped
    wire = step_result_from_proto(step_result_to_proto(result))
    assert (wire.error, wire.adapter_errors, wire.req_ids) == ("", result.adapter_errors, ["a"])
