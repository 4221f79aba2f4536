"""The issue's targets for a serving benchmark run (bench/serving.py): the ratios between
settings, ours beside the roofline's, and the report that ends with them.

Targets (issue 28, on the H100 with the preset and the adapter count as the only flags): S1
with 1,000 adapters at >= 93% of the base model's req/s, S2 at >= 85%; 2,000 adapters at
>= 97% of 5; the base model's output tokens/s at >= 80% of its roofline (prefill FLOPs at the
measured GEMM rate plus decode bytes at the copy bandwidth, at the batch the run reached);
each in a run that touches >= 60% of the adapters.
"""
from __future__ import annotations

import math
import os
import statistics

from slora.bench import driver, tp_info
from slora.bench.paper_trace import paper_table

PRESET_TARGETS = {"S1": 0.93, "S2": 0.85}
"""The issue's share of the base model's throughput each preset must keep."""
COUNTS_TARGET = 0.97
ROOFLINE_TARGET = 0.80
TOUCHED_TARGET = 0.60
"""Share of a workload's adapters its requests must name (for a count above 100)."""


def touched_share(w) -> float:
    """Share of the workload's adapters that at least one of its requests names."""
    named = {r.adapter_index for r in w.requests if r.adapter_index >= 0}
    return len(named) / len(w.adapters) if w.adapters else math.nan


def _find(results, via: str, name: str, trial: int = 0):
    """That setting's run in `trial`; a setting run once (in-process, PEFT) stands for every
    trial; None when it was not run then."""
    runs = [r for r in results if r.via == via and r.name == name]
    return next((r for r in runs if r.trial == trial), runs[0] if len(runs) == 1 else None)


def _ratio(a, b, key: str, b_key: str | None = None):
    """a[key] / b[b_key or key]; None when either is missing, zero or NaN."""
    if a is None or b is None:
        return None
    x, y = a.get(key), b.get(b_key or key)
    if not x or not y or any(isinstance(v, float) and math.isnan(v) for v in (x, y)):
        return None
    return x / y


def checks(results: list[driver.RunResult], plan: Plan) -> list[dict]:
    """The issue's done-when ratios: ours, the roofline's where it has one, the target. With
    --repeats, a ratio is taken within each run (trial) and "ours" is their median; "runs"
    lists them."""
    out = []
    trials = sorted({r.trial for r in results}) or [0]

    def add(what: str, ratio, target: float, unit: str = "%"):
        """`ratio(trial, part)`: the ratio of `part` ("metrics" or "roofline") in that trial."""
        runs = [x for x in (ratio(t, "metrics") for t in trials) if x is not None]
        roofs = [x for x in (ratio(t, "roofline") for t in trials) if x is not None]
        ours = statistics.median(runs) if runs else None
        out.append({"check": what, "ours": ours,
                    "roofline": statistics.median(roofs) if roofs else None, "runs": runs,
                    "target": target, "unit": unit,
                    "met": None if ours is None else ours >= target})

    def between(via_a, name_a, via_b, name_b, key, roof_key=None):
        """a[key] / b[key] of two settings' metrics in a trial, and their rooflines'
        roof_key ratio (None without a roof_key)."""
        def ratio(trial, part):
            if part == "roofline" and roof_key is None:
                return None
            a, b = _find(results, via_a, name_a, trial), _find(results, via_b, name_b, trial)
            return _ratio(a and getattr(a, part), b and getattr(b, part),
                          key if part == "metrics" else roof_key)
        return ratio

    def missing(trial, part):
        return None

    rps, tok_s = "throughput_rps", "output_tokens_per_s"
    for w in plan.main:
        add(f"{w.name} vs base, req/s",
            between("grpc", w.name, "grpc", plan.base.name, rps, tok_s) if plan.base else missing,
            PRESET_TARGETS.get(w.name.split()[0], 0.90))
    if plan.counts:
        by_n = sorted([plan.main[0]] + plan.counts, key=lambda w: w.config.num_adapters)
        lo, hi = by_n[0], by_n[-1]
        add(f"{hi.config.num_adapters} vs {lo.config.num_adapters} adapters, req/s",
            between("grpc", hi.name, "grpc", lo.name, rps, tok_s), COUNTS_TARGET)
    first = plan.main[0].name
    if plan.peft is not None:
        add(f"{first} vs PEFT (its sample), req/s",
            between("grpc", first, "peft", plan.peft.name, rps), 30.0, unit="x")
    add(f"gRPC vs in-process, {first}, req/s",
        between("grpc", first, "engine", f"{first}, in-process", rps), 0.95)

    roof_of = plan.base.name if plan.base else first

    def roofline(trial, part):
        r = _find(results, "grpc", roof_of, trial)
        return None if part == "roofline" else _ratio(r and r.metrics, r and r.roofline, tok_s)
    add(f"{roof_of} output tok/s vs its roofline at the batch reached", roofline,
        ROOFLINE_TARGET)
    for w in plan.main + plan.counts:
        if len(w.adapters) > 100:
            share = touched_share(w)
            add(f"{w.name}: adapters its requests touch", lambda t, part, s=share:
                None if part == "roofline" else s, TOUCHED_TARGET)
    return out


def checks_table(rows: list[dict]) -> str:
    lines = ["| target | ours | roofline | needed | |", "|---|---:|---:|---:|---|"]
    for c in rows:
        fmt = (lambda x: "–" if x is None else f"{x:.1f}x") if c["unit"] == "x" else (
            lambda x: "–" if x is None else f"{x:.1%}")
        status = "–" if c["met"] is None else ("met" if c["met"] else "MISSED")
        ours = fmt(c["ours"])
        runs = c.get("runs") or []
        if len(runs) > 1:
            ours += f" (median of {len(runs)}: {fmt(min(runs))}–{fmt(max(runs))})"
        lines.append(f"| {c['check']} | {ours} | {fmt(c['roofline'])} "
                     f"| ≥ {fmt(c['target'])} | {status} |")
    return "\n".join(lines)


def _ranks(payload: dict) -> str:
    """", tensor parallel N ranks (GPUs)" where N > 1."""
    n = payload.get("tensor_parallel_size", 1)
    return f", tensor parallel {n} ranks ({', '.join(payload['gpus'])})" if n > 1 else ""


def report(payload: dict, results: list[driver.RunResult], out_dir: str) -> str:
    bw = payload["copy_bytes_per_s"] / 1e9
    gemm = payload.get("gemm_flops_per_s", math.nan) / 1e12
    head = (f"Serving benchmark, {payload['date']}: {payload['model']} ({payload['dtype']}) on "
            f"{payload['device']}{_ranks(payload)}; copy bandwidth {bw:.0f} GB/s, GEMM {gemm:.0f} TFLOP/s; "
            f"max_num_seqs {payload.get('max_num_seqs')}; each roofline at the batch its run "
            f"reached (output tokens per step).\n\n`{payload['command']}`")
    notes = [f"* failed: {e}" for e in payload["errors"]]
    notes += [f"* skipped: {s}" for s in payload["skipped"]]
    parts = [head] + (["\n".join(notes)] if notes else [])
    profile = tp_info.profile_table(payload.get("tp_profile"))
    tables = [driver.results_table(results)] + ([profile] if profile else []) + [
        checks_table(payload["checks"])]
    if payload["args"].get("trace") == "paper":
        tables.append(paper_table(results))
    text = "\n\n".join(parts + tables)
    with open(os.path.join(out_dir, "serving.md"), "w") as f:
        f.write(text + "\n")
    return text
