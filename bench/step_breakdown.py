"""Where the serving benchmark's time goes, step by step: the in-process engine runs
bench/serving.py's own workloads (same flags), and every worker step is timed and sorted by
kind (decode only or mixed with prefill, with or without adapter loads), with the host time
of each phase of `Worker.execute` and the GPU time of writing loaded adapters' rows.

    python bench/step_breakdown.py [serving.py flags, e.g. --presets S1 --num-requests 200]

Each step runs between two device synchronisations, so a step's time here is its whole cost:
host work the GPU waits for and GPU work alike. Columns are means per step in ms: `step`,
then host time in the host cache (`cache`), starting adapter copies (`load`), evictions
(`evict`), building the batch (`build`), writing adapter rows (`commit`, and `commit GPU`
from CUDA events), the forward pass launch (`forward`) and sampling, which waits for the GPU
(`sample`).
"""
from __future__ import annotations

import collections
import statistics
import sys
import time

import torch

from slora.bench import baselines, driver, serving
import slora.worker.executor as executor

COLUMNS = ("step", "cache", "load", "evict", "build", "commit", "commit GPU", "forward",
           "sample")
GROUPS = {
    "decode, no load": lambda s: s["prefill"] == 0 and s["loads"] == 0,
    "decode, loads": lambda s: s["prefill"] == 0 and s["loads"] > 0,
    "mixed, no load": lambda s: s["prefill"] > 0 and s["loads"] == 0,
    "mixed, loads": lambda s: s["prefill"] > 0 and s["loads"] > 0,
}


class StepTimer:
    """Wraps a worker's execute and the phases inside it with timers."""

    def __init__(self, worker):
        self.worker = worker
        self.cuda = worker.device.type == "cuda"
        self.steps: list[dict] = []
        self._cur: dict[str, float] = collections.defaultdict(float)
        self._events = []
        for obj, name, key in ((worker.pool, "load_adapter", "load"),
                               (worker.pool, "commit_loads", "commit"),
                               (worker.pool, "evict_adapter", "evict"),
                               (worker.host_cache, "get", "cache"),
                               (worker.inputs, "build", "build"),
                               (worker, "_forward", "forward")):
            self._wrap(obj, name, key)
        sample = executor.sample

        def timed_sample(*args, **kwargs):
            start = time.perf_counter()
            out = sample(*args, **kwargs)
            self._cur["sample"] += time.perf_counter() - start
            return out

        executor.sample = timed_sample
        execute = worker.execute

        def timed_execute(cmd):
            self._sync()
            self._cur.clear()
            self._events.clear()
            start = time.perf_counter()
            result = execute(cmd)
            self._sync()
            row = dict(self._cur, step=time.perf_counter() - start)
            for e0, e1 in self._events:
                row["commit GPU"] = row.get("commit GPU", 0.0) + e0.elapsed_time(e1) / 1e3
            row["prefill"] = sum(n.num_scheduled_tokens for n in cmd.new_requests) + sum(
                r.num_scheduled_tokens for r in cmd.running_requests
                if r.num_scheduled_tokens != 1)
            row["loads"] = len(cmd.adapter_loads)
            self.steps.append(row)
            return result

        worker.execute = timed_execute

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.worker.device)

    def _wrap(self, obj, name, key):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            if self.cuda and key == "commit":
                e0 = torch.cuda.Event(enable_timing=True)
                e0.record()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._cur[key] += time.perf_counter() - start
            if self.cuda and key == "commit":
                e1 = torch.cuda.Event(enable_timing=True)
                e1.record()
                self._events.append((e0, e1))
            return out

        setattr(obj, name, timed)


def table(steps: list[dict]) -> str:
    lines = ["| steps | n | " + " | ".join(COLUMNS) + " | loads per step |",
             "|---|---:|" + "---:|" * (len(COLUMNS) + 1)]
    for name, keep in GROUPS.items():
        rows = [s for s in steps if keep(s)]
        if rows:
            means = [1e3 * statistics.mean(s.get(c, 0.0) for s in rows) for c in COLUMNS]
            lines.append(f"| {name} | {len(rows)} | " + " | ".join(f"{m:.2f}" for m in means)
                         + f" | {statistics.mean(s['loads'] for s in rows):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = serving.build_parser().parse_args(argv + ["--out", "/tmp/slora-step-breakdown"])
    run = serving.Run(args)
    plan = run.plan
    engine = baselines.build_engine(run.engine_argv, plan.adapters, None,
                                    backend=args.backend, prepare_ranks=run.ranks)
    timer = StepTimer(engine.worker)
    workloads = ([plan.base] if plan.base else []) + plan.main + plan.counts
    for w in workloads:
        driver.run_engine(engine, serving.warmup_workload(w, args.warmup_requests))
    for w in workloads:
        timer.steps.clear()
        result = driver.run_engine(engine, w)
        total = sum(s["step"] for s in timer.steps)
        print(f"\n## {w.name}: {len(timer.steps)} steps, {total:.2f} s in steps, wall "
              f"{result.wall_s:.2f} s, {result.stats.get('adapter_loads', 0)} adapter loads "
              f"({result.stats.get('adapter_prefetches', 0)} ahead of admission)\n")
        print(table(timer.steps), flush=True)


if __name__ == "__main__":
    main()
