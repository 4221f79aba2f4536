"""How many replicas, and which routing: the real router (frontend/routing.py) driven by a
discrete-event model of N replicas serving many adapters.

    python -m slora.bench.routing_sim                      # the table of docs/REPLICAS.md
    python -m slora.bench.routing_sim --replicas 8 --adapters 10000 --rate 200

Each replica is modelled the way the scheduler runs it: continuous batching up to
`max_num_seqs`, a request admitted when its adapter is in the pool, one token per running
request per step, the prompt in its first step. A step lasts the measured decode step of
Llama-2-7B with adapters on one H100 (docs/PERFORMANCE.md, CUDA graphs, batch 1..256:
7.54..30.77 ms, linear between the measured batches) plus PREFILL_S_PER_TOKEN for each
prompt token in it, plus the copy of each adapter it loads: from host memory at the
measured 27.9 GB/s, or, when the adapter is not in the replica's host cache either, from
disk at --disk-gbps first. Adapters take `max_adapter_slots` GPU slots (least recently used
out, never one in use) and the host cache holds `host_cache_adapters` of them.

The router sees what the frontend sees: the registry as of the last publish (every
PUBLISH_S of simulated time, the scheduler's MIN_PUBLISH_INTERVAL_S) plus its own requests
sent since then. Requests: the paper's workload (bench/workload.py: Poisson arrivals, input
and output lengths uniform in [8, 512)), adapters by Zipf popularity.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from slora.adapter_store.replicas import MIN_PUBLISH_INTERVAL_S, ReplicaLoad, ReplicaState
from slora.frontend.routing import POLICIES, Router

DECODE_STEP_MS = ((1, 7.54), (8, 8.43), (16, 8.78), (32, 10.28), (64, 13.67),
                  (128, 20.39), (256, 30.77))
"""(batch, ms) of a Llama-2-7B decode step with one rank-16 adapter per request, CUDA
graphs, H100 (docs/PERFORMANCE.md, decode step, H100 2026-11-24)."""
PREFILL_S_PER_TOKEN = 30e-6
"""A prompt token's share of a mixed step: 2 x 6.7 GFLOP at about 450 TFLOP/s of bf16 GEMM."""
HOST_TO_GPU_GBPS = 27.9
"""Adapter copy, host cache -> pool, measured by bench/decode_step.py on the H100
(256 rank-16 adapters, 8.6 GB, 2026-11-24)."""
ADAPTER_BYTES_PER_RANK = 32 * 4 * 2 * 4096 * 2
"""Llama-2-7B, LoRA on q, k, v, o: 32 layers x 4 modules x (A + B) x 4096 x bf16, per rank."""
PUBLISH_S = MIN_PUBLISH_INTERVAL_S


def decode_step_s(batch: int) -> float:
    xs = [b for b, _ in DECODE_STEP_MS]
    if batch <= xs[0]:
        return DECODE_STEP_MS[0][1] / 1000
    if batch >= xs[-1]:
        (b0, t0), (b1, t1) = DECODE_STEP_MS[-2:]
    else:
        i = bisect.bisect_left(xs, batch)
        (b0, t0), (b1, t1) = DECODE_STEP_MS[i - 1], DECODE_STEP_MS[i]
    return (t0 + (t1 - t0) * (batch - b0) / (b1 - b0)) / 1000


@dataclass
class SimConfig:
    num_replicas: int = 4
    num_adapters: int = 10_000
    rate: float = 200.0
    """Requests per second, all replicas together."""
    duration_s: float = 60.0
    zipf_s: float = 1.0
    rank: int = 16
    max_num_seqs: int = 128
    max_adapter_slots: int = 128
    host_cache_adapters: int = 2048
    disk_gbps: float = 2.0
    """Reading and checking an adapter's files (not measured here: an NVMe-class guess)."""
    input_len: tuple[int, int] = (8, 512)
    output_len: tuple[int, int] = (8, 512)
    seed: int = 0


@dataclass
class Req:
    arrival_s: float
    adapter_id: str
    num_prompt: int
    num_output: int
    first_token_s: float = math.nan
    done_s: float = math.nan
    num_done: int = 0


@dataclass
class Replica:
    name: str
    cfg: SimConfig
    waiting: collections.deque = field(default_factory=collections.deque)
    running: list = field(default_factory=list)
    gpu: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    """adapter id -> requests using it, least recently used first."""
    host: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    busy: bool = False
    num_loads: int = 0
    num_disk_reads: int = 0
    _sets: tuple | None = None
    """The adapter sets as last published (rebuilt only after a load, as the registry
    sends only changes)."""

    def state(self) -> ReplicaState:
        if self._sets is None:
            self._sets = (frozenset(self.gpu), frozenset(self.host))
        free_slots = self.cfg.max_adapter_slots - len(self.gpu)
        return ReplicaState(self.name, self.name, ReplicaLoad(
            num_running=len(self.running), num_waiting=len(self.waiting),
            num_free_pages=free_slots, num_pages=self.cfg.max_adapter_slots,
            max_num_seqs=self.cfg.max_num_seqs), *self._sets)

    def _load(self, adapter_id: str) -> float | None:
        """Makes the adapter resident; seconds it costs, or None without a free slot."""
        if adapter_id in self.gpu:
            self.gpu.move_to_end(adapter_id)
            return 0.0
        if len(self.gpu) >= self.cfg.max_adapter_slots:
            victim = next((a for a, refs in self.gpu.items() if refs == 0), None)
            if victim is None:
                return None
            del self.gpu[victim]
        self.gpu[adapter_id] = 0
        self.num_loads += 1
        self._sets = None
        size = self.cfg.rank * ADAPTER_BYTES_PER_RANK
        seconds = size / (HOST_TO_GPU_GBPS * 1e9)
        if adapter_id in self.host:
            self.host.move_to_end(adapter_id)
        else:
            self.num_disk_reads += 1
            seconds += size / (self.cfg.disk_gbps * 1e9)
            self.host[adapter_id] = True
            if len(self.host) > self.cfg.host_cache_adapters:
                self.host.popitem(last=False)
        return seconds

    def step(self, now: float) -> float | None:
        """Plans one step: admits what fits, returns its duration (None: nothing to run)."""
        extra_s, num_prompt = 0.0, 0
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            load_s = self._load(req.adapter_id)
            if load_s is None:
                break
            self.waiting.popleft()
            self.gpu[req.adapter_id] += 1
            extra_s += load_s
            num_prompt += req.num_prompt
            self.running.append(req)
        if not self.running:
            return None
        return decode_step_s(len(self.running)) + num_prompt * PREFILL_S_PER_TOKEN + extra_s

    def finish_step(self, now: float) -> list[Req]:
        done, still = [], []
        for req in self.running:
            req.num_done += 1
            if req.num_done == 1:
                req.first_token_s = now
            if req.num_done >= req.num_output:
                req.done_s = now
                self.gpu[req.adapter_id] -= 1
                done.append(req)
            else:
                still.append(req)
        self.running = still
        return done


def make_requests(cfg: SimConfig) -> list[Req]:
    rng = np.random.RandomState(cfg.seed)
    n = max(1, int(cfg.rate * cfg.duration_s))
    weights = 1.0 / np.arange(1, cfg.num_adapters + 1) ** cfg.zipf_s
    adapters = rng.choice(cfg.num_adapters, size=n, p=weights / weights.sum())
    inputs = rng.randint(*cfg.input_len, n)
    outputs = rng.randint(*cfg.output_len, n)
    arrivals = np.cumsum(rng.exponential(1.0 / cfg.rate, n))
    return [Req(float(t), f"ad-{a}", int(i), int(o))
            for t, a, i, o in zip(arrivals, adapters, inputs, outputs)]


def simulate(cfg: SimConfig, policy: str) -> dict:
    """Runs the requests through N replicas under `policy`; returns the figures."""
    replicas = [Replica(f"r{i:02d}", cfg) for i in range(cfg.num_replicas)]
    by_name = {r.name: r for r in replicas}
    by_index = {r.name: i for i, r in enumerate(replicas)}
    router = Router(policy)
    requests = make_requests(cfg)
    events = [(req.arrival_s, 0, i, "arrive") for i, req in enumerate(requests)]
    heapq.heapify(events)
    seq = len(events)
    view, view_at = [r.state() for r in replicas], 0.0
    sent = collections.Counter()
    done_count = 0
    while events:
        now, _, index, kind = heapq.heappop(events)
        if kind == "arrive":
            if now - view_at >= PUBLISH_S:
                view, view_at = [r.state() for r in replicas], now
                sent.clear()
            req = requests[index]
            target = by_name[router.rank(req.adapter_id, view, adapter_num_pages=1,
                                         extra_load=sent)[0].replica_id]
            sent[target.name] += 1
            target.waiting.append(req)
            replica, index = target, by_index[target.name]
        else:
            replica = replicas[index]
            done_count += len(replica.finish_step(now))
            replica.busy = False
        if not replica.busy:
            duration = replica.step(now)
            if duration is not None:
                replica.busy = True
                seq += 1
                heapq.heappush(events, (now + duration, seq, index, "step"))
    ttft = np.array([r.first_token_s - r.arrival_s for r in requests])
    end = max(r.done_s for r in requests)
    return {
        "policy": policy, "replicas": cfg.num_replicas,
        "distinct_adapters": len({r.adapter_id for r in requests}),
        "adapter_loads": sum(r.num_loads for r in replicas),
        "disk_reads": sum(r.num_disk_reads for r in replicas),
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "throughput_rps": done_count / end,
        "output_tokens_per_s": sum(r.num_output for r in requests) / end,
    }


def print_table(rows: list[dict]) -> None:
    print("| replicas | policy | adapter loads | disk reads | TTFT p50 (s) | TTFT p99 (s) "
          "| req/s | tokens/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['replicas']} | {r['policy']} | {r['adapter_loads']:,} | "
              f"{r['disk_reads']:,} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
              f"{r['throughput_rps']:.1f} | {r['output_tokens_per_s']:,.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m slora.bench.routing_sim",
                                description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--adapters", type=int, default=None,
                   help="adapters in all (default: 500 per replica)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s in all (default: 8 per replica, about 60%% of the 13.3 "
                        "req/s one H100 serves of this workload with 1,000 adapters)")
    p.add_argument("--duration-s", type=float, default=60.0, help="seconds of arrivals")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-adapter-slots", type=int, default=128)
    p.add_argument("--host-cache-adapters", type=int, default=2048)
    p.add_argument("--disk-gbps", type=float, default=2.0)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    for n in args.replicas:
        if n < 1:
            p.error(f"--replicas: each count must be >= 1, got {n}")
        cfg = SimConfig(num_replicas=n, num_adapters=args.adapters or 500 * n,
                        rate=args.rate or 8.0 * n, duration_s=args.duration_s,
                        zipf_s=args.zipf_s, rank=args.rank,
                        max_adapter_slots=args.max_adapter_slots,
                        host_cache_adapters=args.host_cache_adapters,
                        disk_gbps=args.disk_gbps, seed=args.seed)
        print(f"# {n} replicas: {cfg.num_adapters:,} adapters, {cfg.rate:g} req/s for "
              f"{cfg.duration_s:g} s", flush=True)
        rows += [simulate(cfg, policy) for policy in args.policies]
    print_table(rows)


if __name__ == "__main__":
    main()
