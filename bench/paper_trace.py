"""S-LoRA's own operating points (`python -m slora.bench.serving --trace paper`): the trace
of the paper's Table 3 and its A100 (80 GB) figures, to print ours beside them.

The trace is S-LoRA's `a100-80-table` suite (S-LoRA `benchmarks/exp_suite.py`): R = 10
requests/s for 120 s (1,200 requests), Poisson arrivals (cv 1), uniform adapter popularity
(alpha 1), input and output lengths drawn from [8, 512), seed 42, over 5, 100, 1,000 and
2,000 adapters. bench/workload.py draws it as S-LoRA's `generate_requests`
(`benchmarks/trace.py`) does, so the same seed gives the same requests (tests/test_bench.py
checks it against the generator's definition).

The paper's figures are S-LoRA's own result files for that table, in the S-LoRA repository
at commit c1ddf488781ea7f551cd0bb07bfd097124c93411:
`benchmarks/paper/synthetic/slora/synthetic_num_adapters_a100-80_S{1,2}_slora_table.jsonl`
(S-LoRA: throughput, mean latency, mean first-token latency, each request's max_new_tokens
with ignore_eos as here), `benchmarks/paper/synthetic/vllm/synthetic_num_adapters_a100-80_S2_vllm.jsonl`
(vLLM-packed, 5 adapters) and `benchmarks/paper/peft/num_adapter_a100-80_S{1,2}_peft_fig3.jsonl`
(PEFT), rounded to two decimals.
"""
from __future__ import annotations

from slora.bench.driver import RunResult, _fmt
from slora.bench.workload import WorkloadConfig

PAPER_RATE = 10.0
PAPER_DURATION_S = 120.0
PAPER_COUNTS = (5, 100, 1000, 2000)
PAPER_GPU = "A100 (80 GB)"


def paper_config(num_adapters: int) -> WorkloadConfig:
    """The paper's Table 3 trace over `num_adapters` adapters."""
    return WorkloadConfig(num_adapters=num_adapters,
                          num_requests=int(PAPER_RATE * PAPER_DURATION_S), rate=PAPER_RATE,
                          cv=1.0, alpha=1.0, input_range=(8, 512), output_range=(8, 512),
                          seed=42)


PAPER_SLORA: dict[tuple[str, int], tuple[float, float, float]] = {
    ("S1", 5): (8.05, 20.84, 0.60), ("S1", 100): (7.99, 21.61, 0.62),
    ("S1", 1000): (7.64, 25.93, 1.90), ("S1", 2000): (7.61, 26.22, 2.02),
    ("S2", 5): (7.48, 29.12, 2.66), ("S2", 100): (7.29, 30.74, 4.21),
    ("S2", 1000): (6.69, 38.10, 10.54), ("S2", 2000): (6.73, 37.85, 10.65),
}
"""(preset, adapters) -> S-LoRA's (req/s, mean latency s, mean first-token latency s)."""
PAPER_BASELINES: dict[tuple[str, int], dict[str, float]] = {
    ("S1", 5): {"PEFT": 0.88}, ("S1", 100): {"PEFT": 0.25},
    ("S2", 5): {"PEFT": 0.87, "vLLM-packed": 2.04}, ("S2", 100): {"PEFT": 0.24},
}
"""The paper's baselines' req/s on the same trace, where it ran them."""


def paper_table(results: list[RunResult]) -> str:
    """One row per paper setting we ran through the stack: ours beside S-LoRA's A100 figures
    (and the paper's baselines where it has them)."""
    lines = [f"Beside S-LoRA's own figures on the {PAPER_GPU} (its Table 3 trace; "
             "bench/paper_trace.py cites the files):", "",
             "| setting | ours req/s | S-LoRA req/s | ours / S-LoRA | ours latency mean (s) "
             "| S-LoRA's | ours first token mean (s) | S-LoRA's | paper's baselines req/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.via != "grpc" or r.preset is None:
            continue
        key = (r.preset, r.num_adapters)
        if key not in PAPER_SLORA:
            continue
        rps, latency, ttft = PAPER_SLORA[key]
        m = r.metrics
        ratio = m["throughput_rps"] / rps if m.get("throughput_rps") else None
        base = ", ".join(f"{k} {v:.2f}" for k, v in PAPER_BASELINES.get(key, {}).items())
        lines.append(f"| {r.name} | {_fmt(m['throughput_rps'])} | {rps:.2f} "
                     f"| {_fmt(ratio, '.2f')}x | {_fmt(m['latency_mean_s'])} | {latency:.2f} "
                     f"| {_fmt(m['ttft_mean_s'])} | {ttft:.2f} | {base or '–'} |")
    return "\n".join(lines)
