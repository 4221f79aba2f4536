"""Send a workload and measure it: through the public API (the SDK's AsyncClient, streaming)
or straight into the in-process Engine, with the same requests at the same arrival times.

Each request is sent at its arrival time as token ids, greedy, with ignore_eos and
max_new_tokens = its output length, so it produces exactly that many tokens. Its record
holds when it was sent, when its first token and its last came back, and how many tokens.

Metrics (`summarize`), as the paper's benchmark counts them (S-LoRA `benchmarks/run_exp.py`):
throughput is completed requests over the wall time of the whole run, from the start of the
arrival process to the last request's end (the drain after the last arrival included);
output tokens/s likewise. Latency is end minus send; time to first token (TTFT) is first
token minus send; time per output token (TPOT) is (end - first token) / (tokens - 1). SLO
attainment is the share of all requests whose first token came within the SLO (6 s by
default); a failed request counts as a miss. Output tokens/s at saturation counts, from each
token's arrival time, the tokens that came back while at least the server's max_num_seqs
requests were in flight, over that time (`saturated_rate`): the server's rate with a full
batch, which the decode roofline bounds.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from slora.bench.workload import Request, Workload

DEFAULT_SLO_TTFT_S = 6.0
"""The paper's response-time bound (S-LoRA `slora/utils/metric.py`)."""
NOT_YET = None
"""A time that has not happened (no first token, no end)."""
_engine_runs = itertools.count()
"""Numbers each in-process run, so its request ids never repeat an earlier run's."""


@dataclass
class RequestRecord:
    index: int
    adapter_id: str | None
    prompt_len: int
    output_len: int
    """Tokens asked for."""
    arrival_s: float
    """When the workload says it arrives, seconds from the start of the run."""
    sent_s: float = 0.0
    first_token_s: float | None = NOT_YET
    end_s: float | None = NOT_YET
    num_output_tokens: int = 0
    error: str | None = None
    token_times: list[float] = field(default_factory=list, repr=False)
    """When each output token came back (seconds from the start); not written to JSON."""

    @property
    def completed(self) -> bool:
        return self.error is None and self.end_s is not NOT_YET

    @property
    def latency_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.num_output_tokens - 1)


def new_record(workload: Workload, req: Request) -> RequestRecord:
    return RequestRecord(req.index, workload.adapter_id(req), len(req.prompt_token_ids),
                         req.output_len, req.arrival_s)


@dataclass
class RunResult:
    """One setting's run: what was sent where, every request's record, the wall time."""

    name: str
    via: str
    """"grpc" (the services through the SDK), "engine" (in-process) or "peft"."""
    preset: str | None
    num_adapters: int
    records: list[RequestRecord]
    wall_s: float
    stats: dict = field(default_factory=dict)
    """Scheduler counters over the run (steps, adapter loads, preemptions), when known."""
    metrics: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)
    trial: int = 0
    """Which repeat of the setting this is (bench/serving.py --repeats), from 0."""
    cpu_cores: dict = field(default_factory=dict)
    """Cores each process kept busy over the run (CPU seconds / wall seconds): the stack's
    services and `client`, this process (the SDK's streams): a process near 1.0 (the
    frontend's and the scheduler's event loops are one thread each) limits the run."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["records"] = [{k: v for k, v in asdict(r).items() if k != "token_times"}
                        for r in self.records]
        return d


# -- progress ------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: tqdm when installed, else a line every tenth of the way."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._next_print = 0
        self._start = time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr,
                             mininterval=2.0, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next_print or self.done == self.total:
            print(f"{self.desc}: {self.done}/{self.total} requests "
                  f"({time.perf_counter() - self._start:.0f} s)", file=sys.stderr, flush=True)
            self._next_print = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- through the public API ----------------------------------------------------------------

async def _send_one(client, workload: Workload, req: Request, start: float,
                    progress: Progress) -> RequestRecord:
    rec = new_record(workload, req)
    rec.sent_s = time.perf_counter() - start
    try:
        async for event in client.stream(list(req.prompt_token_ids),
                                         adapter_id=workload.adapter_id(req),
                                         max_new_tokens=req.output_len, ignore_eos=True,
                                         temperature=0.0):
            if event.token_ids:
                t = time.perf_counter() - start
                if rec.first_token_s is NOT_YET:
                    rec.first_token_s = t
                rec.num_output_tokens += len(event.token_ids)
                rec.token_times += [t] * len(event.token_ids)
            if event.finish_reason is not None:
                rec.end_s = time.perf_counter() - start
                if event.finish_reason in ("error", "cancelled"):
                    rec.error = f"finished with {event.finish_reason}"
    except Exception as e:  # SloraClientError, or the stream breaking: a failed request
        rec.error = f"{type(e).__name__}: {e}"
    if rec.end_s is NOT_YET and rec.error is None:
        rec.error = "stream ended without a finish reason"
    progress.update()
    return rec


async def run_grpc_async(target: str, workload: Workload, *, timeout_s: float = 3600.0,
                         stats_fn=None, label: str | None = None) -> RunResult:
    """Sends `workload` to the frontend at `target` through AsyncClient; `stats_fn()` (sync)
    gives the scheduler's counters, read before and after."""
    from slora.client import AsyncClient

    progress = Progress(len(workload.requests), label or workload.name)
    before = stats_fn() if stats_fn else {}
    async with AsyncClient(target, timeout_s=timeout_s) as client:
        start = time.perf_counter()
        tasks = []
        for req in workload.requests:
            delay = start + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send_one(client, workload, req, start, progress)))
        records = await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - start
    progress.close()
    after = stats_fn() if stats_fn else {}
    return RunResult(workload.name, "grpc", None, len(workload.adapters), list(records),
                     wall_s, stats=stats_delta(before, after))


def run_grpc(target: str, workload: Workload, **kwargs) -> RunResult:
    from slora.common.aio import run_async

    return run_async(run_grpc_async(target, workload, **kwargs))


COUNTERS = ("num_steps", "adapter_loads", "adapter_prefetches", "adapter_evictions",
            "preemptions")


def stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in COUNTERS if k in after}


# -- in-process ----------------------------------------------------------------------------

def run_engine(engine, workload: Workload, label: str | None = None) -> RunResult:
    """Sends `workload` into an in-process Engine at the same arrival times: between steps,
    every request whose arrival time has passed is submitted."""
    from slora.common.sampling_params import SamplingParams

    progress = Progress(len(workload.requests), label or workload.name)
    before = dict(engine.scheduler.stats(), num_steps=0)
    pending = collections.deque(workload.requests)
    by_req_id: dict[str, RequestRecord] = {}
    records = []
    num_steps = 0
    run_id = next(_engine_runs)
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0].arrival_s <= now:
            req = pending.popleft()
            rec = new_record(workload, req)
            rec.sent_s = time.perf_counter() - start
            records.append(rec)
            sampling = SamplingParams(max_new_tokens=req.output_len, ignore_eos=True)
            try:
                req_id = engine.submit(list(req.prompt_token_ids), sampling,
                                       workload.adapter_id(req),
                                       req_id=f"bench-{run_id}-{req.index}")
                by_req_id[req_id] = rec
            except Exception as e:  # refused (queue full, bad adapter): a failed request
                rec.error = f"{type(e).__name__}: {e}"
                progress.update()
        if engine.has_unfinished():
            outputs = engine.step()
            num_steps += 1
            t = time.perf_counter() - start
            for out in outputs:
                rec = by_req_id.get(out.req_id)
                if rec is None:
                    continue
                if out.new_token_ids:
                    if rec.first_token_s is NOT_YET:
                        rec.first_token_s = t
                    rec.num_output_tokens += len(out.new_token_ids)
                    rec.token_times += [t] * len(out.new_token_ids)
                if out.finished:
                    rec.end_s = t
                    reason = getattr(out.finish_reason, "value", out.finish_reason)
                    if reason in ("error", "cancelled"):
                        rec.error = f"finished with {reason}"
                    progress.update()
        elif pending:
            time.sleep(max(0.0, min(pending[0].arrival_s - now, 0.05)))
    wall_s = time.perf_counter() - start
    progress.close()
    after = dict(engine.scheduler.stats(), num_steps=num_steps)
    records.sort(key=lambda r: r.index)
    return RunResult(workload.name, "engine", None, len(workload.adapters), records, wall_s,
                     stats=stats_delta(before, after))


# -- metrics -------------------------------------------------------------------------------

def _stats(values: list[float], prefix: str) -> dict:
    if not values:
        return {f"{prefix}_mean_s": math.nan, f"{prefix}_p50_s": math.nan,
                f"{prefix}_p99_s": math.nan}
    v = np.asarray(values, dtype=np.float64)
    return {f"{prefix}_mean_s": float(v.mean()), f"{prefix}_p50_s": float(np.percentile(v, 50)),
            f"{prefix}_p99_s": float(np.percentile(v, 99))}


METRIC_KEYS = (
    "num_requests", "num_completed", "num_failed", "wall_s", "throughput_rps",
    "output_tokens_per_s", "num_output_tokens", "latency_mean_s", "latency_p50_s",
    "latency_p99_s", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p50_s",
    "tpot_p99_s", "slo_ttft_s", "slo_attainment", "output_tokens_per_step",
    "saturation_batch", "saturated_s", "saturated_output_tokens_per_s",
)


def saturated_intervals(records: list[RequestRecord], batch: int) -> list[tuple[float, float]]:
    """The times when at least `batch` requests were in flight (sent, not yet ended): the
    server had a full batch of work, or more waiting. A failed request with no end counts
    until its last token, if any."""
    events = []
    for r in records:
        end = r.end_s if r.end_s is not NOT_YET else (r.token_times[-1] if r.token_times
                                                       else None)
        if end is not None and end > r.sent_s:
            events += [(r.sent_s, 1), (end, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a send at the same instant
    intervals, count, since = [], 0, None
    for t, d in events:
        count += d
        if count >= batch and since is None:
            since = t
        elif count < batch and since is not None:
            if t > since:
                intervals.append((since, t))
            since = None
    return intervals


def saturated_rate(records: list[RequestRecord], batch: int) -> tuple[float, float]:
    """(seconds saturated, output tokens/s over those seconds): the tokens that came back
    while at least `batch` requests were in flight, over that time (NaN when never)."""
    intervals = saturated_intervals(records, batch)
    seconds = sum(b - a for a, b in intervals)
    if seconds <= 0:
        return 0.0, math.nan
    starts = [a for a, _ in intervals]
    tokens = 0
    for r in records:
        for t in r.token_times:
            i = bisect.bisect_right(starts, t) - 1
            if i >= 0 and t <= intervals[i][1]:
                tokens += 1
    return seconds, tokens / seconds


def summarize(result: RunResult, slo_ttft_s: float = DEFAULT_SLO_TTFT_S,
              saturation_batch: int | None = None) -> dict:
    """The run's metrics (METRIC_KEYS; see the module docstring); also kept on `result`.
    With `saturation_batch` (the server's max_num_seqs), also the output tokens/s while the
    server was saturated (`saturated_rate`)."""
    done = [r for r in result.records if r.completed]
    num_tokens = sum(r.num_output_tokens for r in done)
    wall = result.wall_s
    metrics = {
        "num_requests": len(result.records), "num_completed": len(done),
        "num_failed": len(result.records) - len(done), "wall_s": wall,
        "throughput_rps": len(done) / wall if wall > 0 else math.nan,
        "output_tokens_per_s": num_tokens / wall if wall > 0 else math.nan,
        "num_output_tokens": num_tokens,
    }
    metrics.update(_stats([r.latency_s for r in done], "latency"))
    metrics.update(_stats([r.ttft_s for r in done if r.first_token_s is not NOT_YET], "ttft"))
    metrics.update(_stats([t for r in done if (t := r.tpot_s) is not None], "tpot"))
    met = sum(1 for r in done if r.first_token_s is not NOT_YET and r.ttft_s < slo_ttft_s)
    metrics["slo_ttft_s"] = slo_ttft_s
    metrics["slo_attainment"] = met / len(result.records) if result.records else math.nan
    steps = result.stats.get("num_steps", 0)
    metrics["output_tokens_per_step"] = num_tokens / steps if steps else math.nan
    metrics["saturation_batch"] = saturation_batch
    metrics["saturated_s"], metrics["saturated_output_tokens_per_s"] = (
        saturated_rate(result.records, saturation_batch) if saturation_batch
        else (0.0, math.nan))
    result.metrics = metrics
    return metrics


# -- reports -------------------------------------------------------------------------------

def _fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x * scale, spec)


def _busiest(cpu_cores: dict) -> str:
    """The busiest of the single-threaded event loops (frontend, scheduler, client): the
    worker is left out, since waiting for a GPU it spins a core whatever the load."""
    loops = {n: c for n, c in cpu_cores.items() if n != "worker"}
    if not loops:
        return "–"
    name = max(loops, key=loops.get)
    return f"{name} {cpu_cores[name]:.2f}"


def results_table(results: list[RunResult]) -> str:
    """One markdown row per run."""
    head = ("| setting | via | adapters | req/s | out tok/s | latency mean / p50 / p99 (s) "
            "| TTFT mean / p99 (s) | TPOT mean (ms) | SLO | failed | tok/s saturated (s) "
            "| roofline tok/s | saturated / roofline | busiest event loop (cores) |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 11 + "---|"]
    repeated = any(r.trial for r in results)
    for r in results:
        m, roof = r.metrics, r.roofline
        name = f"{r.name} (run {r.trial + 1})" if repeated and r.via == "grpc" else r.name
        roof_tps = roof.get("output_tokens_per_s")
        sat = m.get("saturated_output_tokens_per_s")
        share = (sat / roof_tps) if roof_tps and sat is not None else None
        lines.append(
            f"| {name} | {r.via} | {r.num_adapters} | {_fmt(m['throughput_rps'])} "
            f"| {_fmt(m['output_tokens_per_s'], '.0f')} "
            f"| {_fmt(m['latency_mean_s'])} / {_fmt(m['latency_p50_s'])} / "
            f"{_fmt(m['latency_p99_s'])} | {_fmt(m['ttft_mean_s'])} / {_fmt(m['ttft_p99_s'])} "
            f"| {_fmt(m['tpot_mean_s'], '.1f', 1e3)} | {_fmt(m['slo_attainment'], '.0%')} "
            f"| {m['num_failed']} | {_fmt(sat, '.0f')} ({_fmt(m.get('saturated_s'), '.1f')}) "
            f"| {_fmt(roof_tps, '.0f')} | {_fmt(share, '.0%')} | {_busiest(r.cpu_cores)} |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=1)
