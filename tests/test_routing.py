"""Spec of the routing policy (frontend/routing.py): pure functions of the registry's view,
checked on made-up replicas; the same code the frontend and bench/routing_sim.py run."""
from __future__ import annotations

import collections

import pytest

from slora.adapter_store.replicas import ReplicaLoad, ReplicaState
from slora.frontend.routing import (
    NO_ADAPTER, RoundRobin, Router, home_order, load_bound, rank, rank_least_loaded,
)


def replica(name: str, *, running: int = 0, waiting: int = 0, free_pages: int = 1000,
            gpu=(), host=(), available: bool = True, max_num_seqs: int = 4) -> ReplicaState:
    """max_num_seqs 4: ROOM_FRACTION of it is 1, so the load bound alone decides room."""
    return ReplicaState(name, f"{name}:1", ReplicaLoad(
        num_running=running, num_waiting=waiting, num_free_pages=free_pages, num_pages=1000,
        max_num_seqs=max_num_seqs, available=available), frozenset(gpu), frozenset(host))


def ids(replicas) -> list[str]:
    return [r.replica_id for r in replicas]


def test_an_adapter_goes_to_its_home_when_no_replica_holds_it():
    """Idle replicas, adapter nowhere: the first choice is the adapter's rendezvous home,
    the same whatever order the replicas are listed in."""
    rs = [replica(f"r{i}") for i in range(5)]
    home = home_order("acme", rs)[0].replica_id
    assert ids(rank("acme", rs))[0] == home
    assert ids(rank("acme", list(reversed(rs))))[0] == home


def test_gpu_beats_host_beats_home_while_under_the_bound():
    rs = [replica("a"), replica("b", host=["x"]), replica("c", gpu=["x"])]
    assert ids(rank("x", rs))[:2] == ["c", "b"]


def test_a_replica_past_the_load_bound_is_skipped_even_with_the_adapter():
    """c holds x but carries 10 of the 12 requests: the bound (ceil(1.25 * 13 / 3) = 6) sends x
    to b, which has it in host memory; c comes last (most loaded)."""
    rs = [replica("a", running=1), replica("b", running=1, host=["x"]),
          replica("c", running=10, gpu=["x"])]
    assert load_bound([1, 1, 10]) == 6
    order = ids(rank("x", rs))
    assert order[0] == "b" and order[-1] == "c"


def test_under_a_quarter_of_its_batch_a_replica_keeps_its_adapters_past_the_bound():
    """c holds x and runs 7 of 9 requests, over the bound (ceil(1.25 * 10 / 3) = 5) but under
    a quarter of its 32 seats: x stays on c rather than being loaded on a or b."""
    rs = [replica("a", running=1, max_num_seqs=32), replica("b", running=1, max_num_seqs=32),
          replica("c", running=7, gpu=["x"], max_num_seqs=32)]
    assert ids(rank("x", rs))[0] == "c"
    rs[2] = replica("c", running=8, gpu=["x"], max_num_seqs=32)
    assert ids(rank("x", rs))[0] != "c"


def test_a_replica_without_free_pages_for_the_adapter_is_not_its_new_home():
    rs = [replica(n, free_pages=10) for n in "abc"]
    home = ids(home_order("x", rs))
    full = [replica(n, free_pages=5 if n == home[0] else 10) for n in "abc"]
    assert ids(rank("x", full, adapter_num_pages=8))[0] == home[1]


def test_requests_without_an_adapter_go_to_the_least_loaded():
    rs = [replica("a", running=3), replica("b", running=1), replica("c", waiting=2)]
    assert ids(rank(NO_ADAPTER, rs)) == ["b", "c", "a"]


def test_unavailable_replicas_are_never_ranked():
    rs = [replica("a", available=False, gpu=["x"]), replica("b")]
    assert ids(rank("x", rs)) == ["b"]
    assert ids(rank_least_loaded(rs)) == ["b"]
    assert ids(RoundRobin().rank(rs)) == ["b"]
    assert rank("x", [replica("a", available=False)]) == []


def test_extra_load_counts_requests_sent_since_the_last_read():
    """Two idle replicas; 3 requests already sent to x's home push it past the bound."""
    rs = [replica("a"), replica("b")]
    home = ids(home_order("x", rs))
    assert ids(rank("x", rs, extra_load={home[0]: 3}))[0] == home[1]


def simulate(num_replicas: int, adapter_weights: dict[str, int], num_rounds: int):
    """Sends each adapter's requests `num_rounds` times, keeping every request running
    (load only grows) and marking the adapter resident where it lands; returns adapter ->
    replicas it reached."""
    names = [f"r{i}" for i in range(num_replicas)]
    running = collections.Counter()
    gpu = collections.defaultdict(set)
    reached = collections.defaultdict(set)
    for _ in range(num_rounds):
        for adapter_id, weight in adapter_weights.items():
            for _ in range(weight):
                rs = [replica(n, running=running[n], gpu=gpu[n]) for n in names]
                chosen = rank(adapter_id, rs)[0].replica_id
                running[chosen] += 1
                gpu[chosen].add(adapter_id)
                reached[adapter_id].add(chosen)
    return reached, running


def test_traffic_concentrates_and_a_hot_adapter_spreads():
    """Eight replicas, one hot adapter (40 requests a round) and 40 cold ones (1 each): the
    cold adapters stay on one replica each but for a few that the bound moves (round-robin
    would put each on 2), the hot one spreads over several, and the busiest replica stays
    within the bound of the mean."""
    weights = {"hot": 40, **{f"cold{i}": 1 for i in range(40)}}
    reached, running = simulate(8, weights, num_rounds=2)
    assert sum(len(reached[f"cold{i}"]) for i in range(40)) <= 1.2 * 40
    assert len(reached["hot"]) >= 3
    total = sum(running.values())
    assert max(running.values()) <= load_bound([total], 1.25 / 8) + 1


def test_a_replica_leaving_moves_only_its_own_adapters():
    """Rendezvous homes: removing one of 10 replicas changes the home of only the adapters
    whose home it was."""
    rs = [replica(f"r{i}") for i in range(10)]
    before = {f"ad{j}": home_order(f"ad{j}", rs)[0].replica_id for j in range(500)}
    after = {a: home_order(a, rs[1:])[0].replica_id for a in before}
    moved = [a for a in before if before[a] != after[a]]
    assert moved and all(before[a] == "r0" for a in moved)


def test_round_robin_cycles_and_router_refuses_unknown_policies():
    rs = [replica(n) for n in "abc"]
    rr = Router("round-robin")
    assert [ids(rr.rank("x", rs))[0] for _ in range(4)] == ["a", "b", "c", "a"]
    assert ids(Router("least-loaded").rank("x", [replica("a", running=2), replica("b")])) \
        == ["b", "a"]
    with pytest.raises(ValueError, match="'random' is not one of"):
        Router("random")
    with pytest.raises(ValueError, match="load_factor must be >= 1, got 0.5"):
        Router(load_factor=0.5)
