"""Which replica serves a request: pure functions of the registry's view (no I/O), shared by
the frontend (replica_set.py) and the simulation (bench/routing_sim.py).

The policy, `adapter_affinity`. Loading an adapter costs a disk or host-memory read and pool
pages, so an adapter's requests should go where it already is, and each adapter should live
on as few replicas as its traffic needs. The replicas are ranked for each adapter by
rendezvous hashing (highest random weight: a hash of adapter id and replica id), which gives
every adapter a stable "home" order over the replicas that moves only 1/N of adapters when a
replica joins or leaves, like consistent hashing. Loads are bounded as in consistent hashing
with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): a replica has room while its
requests (running + waiting), the new one included, stay within ceil(`load_factor` times
the mean, counting the new one), or under ROOM_FRACTION of its max_num_seqs (a light load is
not worth an adapter load to balance). Then, first
fit in this order:

  1. a replica with room that holds the adapter in its GPU pool (in home order);
  2. one with room that holds it in host memory (a copy to the GPU, no disk read);
  3. one with room and enough free pages for it, in home order: the adapter's home;
  4. the rest, least loaded first (everyone is past the bound: spread evenly).

A hot adapter fills its home up to the bound, spills to the next replica of its order, which
loads it and from then on takes its overflow in tier 1: the more load, the more replicas,
and a cold adapter stays on one. Requests without an adapter go to the least loaded.

`rank` returns every usable replica in preference order: the frontend tries the first and,
when it fails before the first token, the next ones.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence

from slora.adapter_store.replicas import ReplicaState

DEFAULT_LOAD_FACTOR = 1.25
"""A replica has room below this multiple of the mean load (+1): the bound of consistent
hashing with bounded loads; 1.25 keeps the busiest replica within 25% of the mean."""
ROOM_FRACTION = 0.25
"""Below this fraction of its max_num_seqs a replica always has room: a decode step's time
grows slowly with its batch (Llama-2-7B on an H100: 7.5 ms at batch 1, 10.3 ms at 32,
docs/PERFORMANCE.md), so a few more requests where the adapter already is cost less than
loading it elsewhere; past it the bound balances the load."""
NO_ADAPTER = ""
POLICIES = ("adapter-affinity", "least-loaded", "round-robin")


def home_weight(adapter_id: str, replica_id: str) -> int:
    """The rendezvous-hashing weight of a replica for an adapter (stable across processes)."""
    digest = hashlib.blake2b(f"{adapter_id}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def home_order(adapter_id: str, replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    """The replicas in the adapter's rendezvous order, its home first."""
    return sorted(replicas, key=lambda r: (-home_weight(adapter_id, r.replica_id), r.replica_id))


def load_bound(loads: Sequence[int], load_factor: float = DEFAULT_LOAD_FACTOR) -> int:
    """Requests a replica may hold, the new one included: ceil(c * (m + 1) / n) for m
    requests over n replicas, as in consistent hashing with bounded loads."""
    return math.ceil(load_factor * (sum(loads) + 1) / max(1, len(loads)))


def _least_loaded(replicas, load_of) -> list[ReplicaState]:
    return sorted(replicas, key=lambda r: (load_of(r), r.replica_id))


def rank(adapter_id: str, replicas: Sequence[ReplicaState], *, adapter_num_pages: int = 0,
         extra_load: Mapping[str, int] | None = None,
         load_factor: float = DEFAULT_LOAD_FACTOR) -> list[ReplicaState]:
    """The adapter-affinity order of the available replicas for one request.

    `extra_load`: requests to add to (or, negative, take from) a replica's load as read,
    for what the caller sent and saw finish since it read it."""
    usable = [r for r in replicas if r.load.available]
    if not usable:
        return []
    extra = extra_load or {}

    def load_of(r: ReplicaState) -> int:
        return max(0, r.num_requests + extra.get(r.replica_id, 0))

    if adapter_id == NO_ADAPTER:
        return _least_loaded(usable, load_of)
    bound = load_bound([load_of(r) for r in usable], load_factor)
    order = home_order(adapter_id, usable)
    on_gpu, in_host, fits, rest = [], [], [], []
    for r in order:
        if load_of(r) + 1 > max(bound, int(r.load.max_num_seqs * ROOM_FRACTION)):
            rest.append(r)
        elif adapter_id in r.gpu_adapters:
            on_gpu.append(r)
        elif adapter_id in r.host_adapters:
            in_host.append(r)
        elif r.load.num_free_pages >= adapter_num_pages:
            fits.append(r)
        else:
            rest.append(r)
    chosen = on_gpu + in_host + fits
    rest = _least_loaded(rest, load_of)
    return chosen + rest


def rank_least_loaded(replicas: Sequence[ReplicaState],
                      extra_load: Mapping[str, int] | None = None) -> list[ReplicaState]:
    """Baseline: the least loaded available replica first, adapters ignored."""
    extra = extra_load or {}
    return _least_loaded([r for r in replicas if r.load.available],
                         lambda r: r.num_requests + extra.get(r.replica_id, 0))


class RoundRobin:
    """Baseline: the available replicas in turn, adapters and load ignored."""

    def __init__(self):
        self._counter = itertools.count()

    def rank(self, replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
        usable = sorted((r for r in replicas if r.load.available), key=lambda r: r.replica_id)
        if not usable:
            return []
        start = next(self._counter) % len(usable)
        return usable[start:] + usable[:start]


class Router:
    """One of POLICIES over the registry's view: `rank(adapter_id, replicas, ...)`."""

    def __init__(self, policy: str = POLICIES[0], load_factor: float = DEFAULT_LOAD_FACTOR):
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r} is not one of {', '.join(POLICIES)}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1, got {load_factor}")
        self.policy, self.load_factor = policy, load_factor
        self._round_robin = RoundRobin()

    def rank(self, adapter_id: str, replicas: Sequence[ReplicaState], *,
             adapter_num_pages: int = 0,
             extra_load: Mapping[str, int] | None = None) -> list[ReplicaState]:
        if self.policy == "round-robin":
            return self._round_robin.rank(replicas)
        if self.policy == "least-loaded":
            return rank_least_loaded(replicas, extra_load)
        return rank(adapter_id, replicas, adapter_num_pages=adapter_num_pages,
                    extra_load=extra_load, load_factor=self.load_factor)
