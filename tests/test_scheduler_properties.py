"""The real scheduler and page table, fed made-up worker results: random arrivals,
finishes, cancels and adapter loads never leave a page owned twice, and draining frees
every page."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.protos.step import StepCommand, StepResult
from slora.scheduler.adapter_residency import AdapterRef
from slora.scheduler.planner import Scheduler
from slora.models.registry import dummy_model_config

MODEL = dummy_model_config("dummy-tiny")  # 13 pages per rank on all modules
ADAPTERS = [AdapterRef(f"a{i}", f"/adapters/a{i}", MODEL.adapter_num_pages({"q_proj": r,
            "down_proj": r})) for i, r in enumerate([1, 2, 4, 8, 16, 3])]


def create_scheduler(num_pages: int, max_slots: int, budget: int) -> Scheduler:
    return Scheduler(EngineConfig(
        model=MODEL, pool=PoolConfig(num_pages=num_pages, max_adapter_slots=max_slots,
                                     max_lora_rank=16),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                  max_model_len=48, max_queue_len=64)))


def fake_worker(cmd: StepCommand, token_of: dict[str, int], eos_draw) -> StepResult:
    """Samples a token for each request whose scheduled tokens reach its end."""
    result = StepResult(cmd.step_id)
    for new in cmd.new_requests:
        token_of[new.req_id] = len(new.token_ids)
    ends = {n.req_id: n.num_scheduled_tokens == len(n.token_ids) for n in cmd.new_requests}
    for run in cmd.running_requests:
        ends[run.req_id] = run.num_computed_tokens + run.num_scheduled_tokens == \
            token_of[run.req_id]
    for req_id, at_end in ends.items():
        if at_end:
            token_of[req_id] += 1
            result.req_ids.append(req_id)
            result.token_ids.append(2 if eos_draw() else 7)
            result.logprobs.append(-0.5)
    return result


request = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([None] + ADAPTERS))
event = st.one_of(
    st.tuples(st.just("submit"), request),
    st.tuples(st.just("step"), st.just(None)),
    st.tuples(st.just("step"), st.just(None)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event, max_size=120), num_pages=st.integers(256, 500),
       max_slots=st.integers(1, 4), budget=st.integers(8, 64), eos_seed=st.integers(0, 9),
       pipelined=st.booleans())
def test_no_page_owned_twice_and_drain_frees_everything(events, num_pages, max_slots, budget,
                                                        eos_seed, pipelined):
    """With `pipelined`, step N+1 is planned before step N's results are back, as the
    scheduler process does."""
    sched = create_scheduler(num_pages, max_slots, budget)
    token_of: dict[str, int] = {}
    counter = [eos_seed]

    def eos_draw() -> bool:
        counter[0] = (counter[0] * 7 + 3) % 11
        return counter[0] == 0

    in_flight: list[StepResult] = []

    def step():
        in_flight.append(fake_worker(sched.schedule(), token_of, eos_draw))
        if len(in_flight) > (1 if pipelined else 0):
            sched.update(in_flight.pop(0))

    submitted: list[str] = []
    for kind, arg in events:
        if kind == "submit":
            prompt_len, max_new, adapter = arg
            req_id = f"r{len(submitted)}"
            if len(sched.waiting) < sched.config.scheduler.max_queue_len:
                sched.submit(req_id, [5] * prompt_len,
                             SamplingParams(max_new_tokens=max_new), adapter)
                submitted.append(req_id)
        elif kind == "cancel" and submitted:
            sched.cancel(submitted[arg % len(submitted)])
        else:
            step()
        sched.check_invariants()

    for _ in range(5000):
        if not sched.has_unfinished():
            break
        step()
        sched.check_invariants()
    assert not sched.has_unfinished(), "requests left after 5000 steps: the scheduler stalled"
    sched.schedule()  # hands the last finished ids to the worker
    assert sched.page_table.usage()["kv"] == 0
    assert all(e.num_refs == 0 for e in sched.residency.resident.values())
    sched.residency.make_room(num_pages, StepCommand(step_id=-1))
    assert sched.page_table.num_free == num_pages
    sched.check_invariants()
