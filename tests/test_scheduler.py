"""The planner's behaviours, one by one, with made-up worker results."""
from __future__ import annotations

from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig, dummy_model_config
from slora.common.sampling_params import SamplingParams
from slora.protos.step import StepResult
from slora.scheduler.adapter_residency import AdapterRef
from slora.scheduler.planner import Scheduler

MODEL = dummy_model_config("dummy-tiny")


def create_scheduler(num_pages=1024, max_num_seqs=8, budget=64) -> Scheduler:
    return Scheduler(EngineConfig(
        model=MODEL, pool=PoolConfig(num_pages=num_pages, max_adapter_slots=4, max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                  max_model_len=64)))


def adapter(name: str, rank: int = 4) -> AdapterRef:
    return AdapterRef(name, f"/adapters/{name}", MODEL.adapter_num_pages({"q_proj": rank}))


def sample_all(cmd, token: int = 7) -> StepResult:
    ids = [r.req_id for r in cmd.new_requests if r.num_scheduled_tokens == len(r.token_ids)]
    ids += [r.req_id for r in cmd.running_requests]
    return StepResult(cmd.step_id, ids, [token] * len(ids), [-1.0] * len(ids))


def test_queued_requests_adapter_is_loaded_before_admission():
    """While one request runs (batch of one), the adapter of the next queued request is
    loaded into a free slot; admitting that request later needs no load."""
    sched = create_scheduler(max_num_seqs=1)
    sched.submit("r1", [5, 6, 7], SamplingParams(max_new_tokens=2), adapter("a"))
    sched.submit("r2", [5, 6], SamplingParams(max_new_tokens=2), adapter("b"))
    first = sched.schedule()
    assert [l.adapter_id for l in first.adapter_loads] == ["a", "b"]
    assert [r.req_id for r in first.new_requests] == ["r1"]
    sched.update(sample_all(first))
    sched.update(sample_all(sched.schedule()))  # r1 finishes
    admit = sched.schedule()
    assert [r.req_id for r in admit.new_requests] == ["r2"] and not admit.adapter_loads
    sched.check_invariants()


def test_prefetch_never_evicts_and_keeps_room_for_the_queue_head():
    """With the slots full of pinned adapters nothing is prefetched."""
    sched = create_scheduler(max_num_seqs=4)
    for i, name in enumerate("abcd"):
        sched.submit(f"r{i}", [5] * 3, SamplingParams(max_new_tokens=5), adapter(name))
    sched.submit("r4", [5] * 3, SamplingParams(max_new_tokens=5), adapter("e"))
    cmd = sched.schedule()
    assert [l.adapter_id for l in cmd.adapter_loads] == list("abcd")
    assert not cmd.adapter_evictions
    sched.check_invariants()
