"""The planner's behaviours, one by one, with made-up worker results."""
from __future__ import annotations

from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.protos.step import StepResult
from slora.scheduler.adapter_residency import AdapterRef
from slora.scheduler.planner import Scheduler
from slora.models.registry import dummy_model_config

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


def test_prefetch_waits_while_every_slot_is_pinned():
    """With the slots full of adapters that running requests use, nothing is prefetched
    and nothing evicted."""
    sched = create_scheduler(max_num_seqs=4)
    for i, name in enumerate("abcd"):
        sched.submit(f"r{i}", [5] * 3, SamplingParams(max_new_tokens=5), adapter(name))
    sched.submit("r4", [5] * 3, SamplingParams(max_new_tokens=5), adapter("e"))
    cmd = sched.schedule()
    assert [l.adapter_id for l in cmd.adapter_loads] == list("abcd")
    assert not cmd.adapter_evictions
    sched.check_invariants()


def run_until_done(sched, req_ids):
    while any(r in sched.requests for r in req_ids):
        sched.update(sample_all(sched.schedule()))


def test_prefetch_evicts_an_idle_adapter_for_a_queued_request():
    """Every slot holds an adapter no request uses any more (as after serving more
    adapters than there are slots): the next queued request's adapter still loads ahead of
    its admission, into the least recently used one's slot, and its admission loads
    nothing."""
    sched = create_scheduler(max_num_seqs=1)
    for i, name in enumerate("abcd"):
        sched.submit(f"r{i}", [5] * 3, SamplingParams(max_new_tokens=1), adapter(name))
    run_until_done(sched, [f"r{i}" for i in range(4)])
    assert list(sched.residency.resident) == list("abcd")
    sched.submit("r4", [5] * 3, SamplingParams(max_new_tokens=3), adapter("a"))
    sched.submit("r5", [5] * 3, SamplingParams(max_new_tokens=1), adapter("e"))
    first = sched.schedule()  # admits r4 (a is resident); prefetches e for r5
    assert [r.req_id for r in first.new_requests] == ["r4"]
    assert [l.adapter_id for l in first.adapter_loads] == ["e"]
    assert first.adapter_evictions == [sched.residency.resident["e"].slot]
    assert "b" not in sched.residency.resident  # the least recently used idle one
    sched.check_invariants()
    sched.update(sample_all(first))
    run_until_done(sched, ["r4"])
    admit = sched.schedule()
    assert [r.req_id for r in admit.new_requests] == ["r5"] and not admit.adapter_loads
    sched.check_invariants()


def test_prefetch_never_evicts_what_the_queue_needs_next():
    """Two slots, both holding idle adapters that queued requests need: the third queued
    request's adapter is not prefetched at their expense."""
    sched = Scheduler(EngineConfig(
        model=MODEL, pool=PoolConfig(num_pages=1024, max_adapter_slots=2, max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64,
                                  max_model_len=64)))
    for i, name in enumerate("ab"):
        sched.submit(f"w{i}", [5] * 3, SamplingParams(max_new_tokens=1), adapter(name))
    run_until_done(sched, ["w0", "w1"])
    sched.submit("r0", [5] * 3, SamplingParams(max_new_tokens=3))  # no adapter: runs first
    sched.submit("r1", [5] * 3, SamplingParams(max_new_tokens=1), adapter("a"))
    sched.submit("r2", [5] * 3, SamplingParams(max_new_tokens=1), adapter("b"))
    sched.submit("r3", [5] * 3, SamplingParams(max_new_tokens=1), adapter("c"))
    cmd = sched.schedule()
    assert [r.req_id for r in cmd.new_requests] == ["r0"]
    assert not cmd.adapter_loads and not cmd.adapter_evictions
    assert set(sched.residency.resident) == {"a", "b"}
    sched.check_invariants()


