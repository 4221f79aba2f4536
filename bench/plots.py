"""The serving benchmark's two plots, drawn with matplotlib when it is installed:

* throughput_vs_adapters.png: requests/s through the services against the number of
  adapters, one line per preset, the base model (no adapters) as a dashed line, and each
  point's decode roofline (scaled to the base's measured throughput) as a dotted line;
* latency.png: the distribution (CDF) of request latency and of time to first token, one
  curve per run.
"""
from __future__ import annotations

import os
import statistics
import sys

from slora.bench.driver import RunResult


def plot_all(results: list[RunResult], out_dir: str) -> list[str]:
    """Draws both plots into `out_dir`; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)",
              file=sys.stderr)
        return []
    paths = [_throughput_vs_adapters(plt, results, out_dir), _latency(plt, results, out_dir)]
    return [p for p in paths if p]


def _median_rps(runs: list[RunResult]) -> float:
    return statistics.median(r.metrics["throughput_rps"] for r in runs)


def _throughput_vs_adapters(plt, results: list[RunResult], out_dir: str) -> str | None:
    """With --repeats, each point is the median of its runs, and the runs are small dots."""
    grpc = [r for r in results if r.via == "grpc"]
    if not grpc:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = [r for r in grpc if r.num_adapters == 0]
    base_rps = _median_rps(base) if base else None
    presets = sorted({r.preset for r in grpc if r.preset})
    for preset in presets:
        by_n: dict[int, list[RunResult]] = {}
        for r in grpc:
            if r.preset == preset and r.num_adapters > 0:
                by_n.setdefault(r.num_adapters, []).append(r)
        xs = sorted(by_n)
        line, = ax.plot(xs, [_median_rps(by_n[n]) for n in xs], "o-",
                        label=f"{preset} (ours, gRPC)")
        if any(len(runs) > 1 for runs in by_n.values()):
            ax.plot([r.num_adapters for n in xs for r in by_n[n]],
                    [r.metrics["throughput_rps"] for n in xs for r in by_n[n]], ".",
                    color=line.get_color(), alpha=0.5)
        if base and base[0].roofline and all(by_n[n][0].roofline for n in xs):
            scale = base_rps / base[0].roofline["output_tokens_per_s"]
            ax.plot(xs, [by_n[n][0].roofline["output_tokens_per_s"] * scale for n in xs], ":",
                    color=line.get_color(), label=f"{preset} roofline, scaled to base")
    if base_rps is not None:
        ax.axhline(base_rps, color="gray", ls="--", label="base model, no adapters")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.set_xticks(sorted({r.num_adapters for r in grpc if r.num_adapters > 0}))
    ax.set_xlabel("number of adapters")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Throughput against the number of adapters")
    path = os.path.join(out_dir, "throughput_vs_adapters.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _latency(plt, results: list[RunResult], out_dir: str) -> str | None:
    runs = [r for r in results if r.trial == 0 and any(rec.completed for rec in r.records)]
    if not runs:
        return None
    fig, (ax_lat, ax_ttft) = plt.subplots(1, 2, figsize=(10, 4.2))
    for r in runs:
        done = [rec for rec in r.records if rec.completed]
        label = f"{r.name} ({r.via})"
        for ax, values in ((ax_lat, [rec.latency_s for rec in done]),
                           (ax_ttft, [rec.ttft_s for rec in done])):
            values = sorted(values)
            ax.step([0.0] + values, [0.0] + [(i + 1) / len(values) for i in range(len(values))],
                    where="post", label=label)
    for ax, what in ((ax_lat, "request latency (s)"), (ax_ttft, "time to first token (s)")):
        ax.set_xlabel(what)
        ax.set_ylabel("share of requests")
        ax.grid(True, alpha=0.3)
    if runs and runs[0].metrics.get("slo_ttft_s"):
        ax_ttft.axvline(runs[0].metrics["slo_ttft_s"], color="gray", ls="--", label="SLO")
    ax_ttft.legend(fontsize=7)
    fig.suptitle("Latency distributions")
    path = os.path.join(out_dir, "latency.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
