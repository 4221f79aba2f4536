"""The planner's behaviours, one by one, with made-up worker results."""
from __future__ import annotations

from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.protos.step import StepResult
from slora.scheduler.adapter_residency import AdapterRef
from slora.scheduler.planner import Scheduler
from slora.models.registry import dummy_model_config

MODEL = dummy_model_config("dummy-tiny")


def create_scheduler(num_pages=1024, max_num_seqs=8, budget=64, max_adapter_slots=4,
                     max_model_len=64) -> Scheduler:
    """max_adapter_slots=None: no cap on resident adapters (the default in production)."""
    return Scheduler(EngineConfig(
        model=MODEL, pool=PoolConfig(num_pages=num_pages, max_adapter_slots=max_adapter_slots,
                                     max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                  max_model_len=max_model_len)))


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




def loads_ahead_and_at_admission(sched, submit_per_step, num_steps) -> tuple[int, int]:
    """Runs the scheduler with made-up worker results, submitting requests from
    `submit_per_step(step)` before each step; returns (loads issued in a step before the one
    that admits their first request, loads issued in the admitting step itself)."""
    ahead = at_admission = 0
    for step in range(num_steps):
        for req_id, prompt, params, ref in submit_per_step(step):
            sched.submit(req_id, prompt, params, ref)
        cmd = sched.schedule()
        admitted_slots = {n.adapter_slot for n in cmd.new_requests}
        for load in cmd.adapter_loads:
            if load.slot in admitted_slots:
                at_admission += 1
            else:
                ahead += 1
        sched.update(sample_all(cmd))
        sched.check_invariants()
    return ahead, at_admission


def test_prefetch_runs_ahead_at_high_load_when_idle_adapters_fill_the_pool():
    """High load over many adapters: requests arrive faster than the batch (8) finishes
    them, each with one of 60 adapters, and the pool is too small to keep every adapter
    served so far besides the running requests' KV. Once idle adapters fill the free pages,
    the adapters of the requests queued next are still loaded ahead, by evicting the least
    recently used idle ones: nearly every load comes before the step that admits its
    request (issue 28: 0 of 361 did)."""
    import random

    sched = create_scheduler(num_pages=200, max_num_seqs=8, budget=64, max_adapter_slots=None)
    rng = random.Random(0)
    refs = [adapter(f"a{i}", rank=4) for i in range(60)]  # 4 pages each: 240 if all resident
    counter = iter(range(10**6))

    def arrivals(step):
        if step >= 300:
            return []
        return [(f"r{next(counter)}", [5] * 8, SamplingParams(max_new_tokens=8, ignore_eos=True),
                 rng.choice(refs)) for _ in range(2)]

    ahead, at_admission = loads_ahead_and_at_admission(sched, arrivals, 400)
    stats = sched.stats()
    assert stats["adapter_evictions"] > 50, stats  # idle adapters did fill the pool
    assert stats["num_waiting"] > 0, stats  # the load stayed high to the end
    assert ahead >= 0.9 * (ahead + at_admission), (ahead, at_admission, stats)


def test_no_slot_cap_the_pool_is_the_only_bound_on_resident_adapters():
    """300 requests over 300 distinct adapters (rank 1, one page each) are admitted in one
    step, more than any former fixed slot count (64, 128); 300 more requests over 300 new
    adapters then find the pool full of idle ones and evict them least recently used first,
    exactly as many as their pages need."""
    sched = create_scheduler(num_pages=1300, max_num_seqs=300, budget=2048,
                             max_adapter_slots=None)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for i in range(300):
        sched.submit(f"a{i}", [5, 6, 7], params, adapter(f"a{i}", rank=1))
    cmd = sched.schedule()
    assert len(cmd.new_requests) == 300
    assert len({n.adapter_slot for n in cmd.new_requests}) == 300
    assert len(cmd.adapter_loads) == 300 and not cmd.adapter_evictions
    sched.check_invariants()
    sched.update(sample_all(cmd))
    assert len(sched.residency.resident) == 300 and sched.page_table.num_free == 1000
    for i in range(300):
        sched.submit(f"b{i}", [5, 6, 7], params, adapter(f"b{i}", rank=1))
    cmd = sched.schedule()
    # 1000 free pages: 250 requests' KV (3 pages) and adapter (1 page) fit before the first
    # eviction; each later admission evicts the oldest idle adapter for its adapter's page
    # and 3 more for its KV.
    assert len(cmd.new_requests) == 300
    assert len(cmd.adapter_evictions) == 200
    evicted = {f"a{i}" for i in range(200)}
    assert not evicted & set(sched.residency.resident)
    assert len(sched.residency.resident) == 400 and sched.page_table.num_free == 0
    sched.check_invariants()


def test_loads_run_ahead_while_the_batch_has_room():
    """Below max_num_seqs nothing queues: one request arrives each step, each with a new
    adapter, beside a batch of ~20 running ones. The new request waits one step while its
    adapter loads behind that step, and is admitted the next without a load (before this,
    every load came in the step that admitted its request). A request arriving at an idle
    scheduler is admitted at once."""
    sched = create_scheduler(num_pages=4000, max_num_seqs=64, budget=256,
                             max_adapter_slots=None)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)

    def arrivals(step):
        return [(f"r{step}", [5] * 6, params, adapter(f"a{step}"))] if step < 200 else []

    ahead, at_admission = loads_ahead_and_at_admission(sched, arrivals, 260)
    assert ahead == 199 and at_admission == 1, (ahead, at_admission)  # the first: idle
    assert not sched.has_unfinished()
