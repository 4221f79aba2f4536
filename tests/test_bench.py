"""The serving benchmark (bench/): the paper's workload drawn as its code draws it, dummy
adapters in host memory and as PEFT folders, metrics counted as the paper counts them, the
PEFT baseline on the same weights as the engine, the roofline, and the one command run end
to end on a tiny model on the CPU (every phase, real processes)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from slora.adapter_store import load_peft_adapter
from slora.bench import baselines, driver, serving
from slora.bench.driver import RequestRecord, RunResult
from slora.bench.workload import (
    BANK_WINDOWS, DUMMY_TARGETS, PRESETS, DummyAdapterFactory, Workload, WorkloadConfig,
    adapter_bytes, adapter_popularity, dummy_adapter_loader, generate_requests,
    parse_dummy_path, preset_adapters, write_peft_adapters,
)
from slora.common.errors import ConfigError
from slora.common.sampling_params import SamplingParams
from slora.models.registry import dummy_model_config

TINY = dummy_model_config("dummy-tiny")
LLAMA_7B = dummy_model_config("dummy-llama-7b")


# -- the workload --------------------------------------------------------------------------

def test_trace_is_drawn_as_the_papers_code_draws_it():
    """One legacy RandomState(seed): Power(alpha) adapter draws, then input lengths, then
    output lengths (randint, upper bound exclusive), then Gamma(1/cv^2, cv^2/rate) gaps whose
    running sum is each arrival time."""
    cfg = WorkloadConfig(num_adapters=37, num_requests=300, rate=7.5, cv=2.0, alpha=0.6,
                         input_range=(8, 512), output_range=(16, 128), seed=42)
    reqs = generate_requests(cfg, vocab_size=32000)

    rng = np.random.RandomState(42)
    x = rng.power(0.6, 300)
    inputs = rng.randint(8, 512, 300)
    outputs = rng.randint(16, 128, 300)
    gaps = rng.gamma(1 / 4.0, 4.0 / 7.5, 300)

    assert [r.adapter_index for r in reqs] == list((x * 37).astype(int))
    assert [len(r.prompt_token_ids) for r in reqs] == list(inputs)
    assert [r.output_len for r in reqs] == list(outputs)
    assert np.allclose([r.arrival_s for r in reqs], np.cumsum(gaps))
    assert all(3 <= t < 32000 for r in reqs for t in r.prompt_token_ids)
    assert generate_requests(cfg, 32000) == reqs  # seeded


def s_lora_generate_requests(num_adapters, alpha, req_rate, cv, duration, input_range,
                             output_range, seed=42):
    """S-LoRA's generator (benchmarks/trace.py `generate_requests`) as its definition reads:
    the global legacy numpy stream seeded once; int(rate x duration) requests; Power(alpha)
    draws times the adapter count, truncated to int; randint input then output lengths;
    Gamma(1/cv^2, cv^2/rate) gaps added one by one to a running float. Returns (adapter
    index, input length, output length, arrival time) per request."""
    np.random.seed(seed)
    total = int(req_rate * duration)
    ind = (np.random.power(alpha, total) * num_adapters).astype(int)
    input_lens = np.random.randint(input_range[0], input_range[1], total)
    output_lens = np.random.randint(output_range[0], output_range[1], total)
    intervals = np.random.gamma(1 / (cv * cv), cv * cv / req_rate, total)
    out, tic = [], 0
    for i in range(total):
        tic += intervals[i]
        out.append((int(ind[i]), int(input_lens[i]), int(output_lens[i]), tic))
    return out


@pytest.mark.parametrize("num_adapters", [5, 100, 1000, 2000])
def test_paper_trace_is_s_loras_trace_bit_for_bit(num_adapters):
    """--trace paper: the Table 3 trace (10 req/s for 120 s, seed 42) gives exactly S-LoRA's
    requests: the same adapters, lengths and arrival times, to the last bit of each float."""
    from slora.bench.paper_trace import paper_config

    cfg = paper_config(num_adapters)
    reqs = generate_requests(cfg, LLAMA_7B.vocab_size)
    theirs = s_lora_generate_requests(num_adapters, 1, 10, 1, 120, (8, 512), (8, 512))
    assert len(reqs) == len(theirs) == 1200
    ours = [(r.adapter_index, len(r.prompt_token_ids), r.output_len, r.arrival_s) for r in reqs]
    assert ours == theirs


def test_capacity_mode_has_enough_requests_to_touch_most_adapters():
    """The default (capacity) plan draws enough requests that at least 60% of the 1,000 and
    of the 2,000 adapters are named by some request, and names that share as a check."""
    args = serving.build_parser().parse_args(["--model", "dummy-tiny", "--device", "cpu"])
    plan = serving.make_plan(args, TINY)
    assert [w.config.num_adapters for w in plan.main + plan.counts] == [1000, 1000, 5, 2000]
    assert len({len(w.requests) for w in plan.main + plan.counts}) == 1
    for w in plan.main + plan.counts:
        if len(w.adapters) >= 1000:
            assert serving.touched_share(w) >= 0.60, w.name
    paper = serving.make_plan(serving.build_parser().parse_args(
        ["--model", "dummy-tiny", "--trace", "paper"]), TINY)
    assert [w.name for w in paper.main] == [f"{p} {n} adapters" for p in ("S1", "S2")
                                            for n in (5, 100, 1000, 2000)]
    assert paper.base is None and not paper.counts and paper.peft is None
    assert {len(w.requests) for w in paper.main} == {1200}


def test_zipf_popularity_keeps_the_lengths_and_arrivals_of_the_power_trace():
    """Both popularity options take one uniform per request, so only the adapters differ;
    Zipf's most popular adapter is index 0."""
    power = WorkloadConfig(num_adapters=50, num_requests=4000, rate=10.0)
    zipf = WorkloadConfig(num_adapters=50, num_requests=4000, rate=10.0, popularity="zipf",
                          zipf_s=1.2)
    a, b = generate_requests(power, 512), generate_requests(zipf, 512)
    assert [(r.arrival_s, r.output_len, r.prompt_token_ids) for r in a] == \
        [(r.arrival_s, r.output_len, r.prompt_token_ids) for r in b]
    counts = np.bincount([r.adapter_index for r in b], minlength=50)
    p = adapter_popularity(zipf)
    assert counts.argmax() == 0 and np.all(np.diff(p) < 0)
    assert np.abs(counts / 4000 - p).max() < 0.03


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_adapter_frequencies_follow_the_power_law(alpha):
    """floor(n X) with X ~ Power(alpha): uniform at alpha = 1, crowded onto low indices
    below; empirical frequencies match adapter_popularity."""
    cfg = WorkloadConfig(num_adapters=20, num_requests=40000, rate=1.0, alpha=alpha)
    counts = np.bincount([r.adapter_index for r in generate_requests(cfg, 512)], minlength=20)
    p = adapter_popularity(cfg)
    assert math.isclose(p.sum(), 1.0)
    assert np.abs(counts / counts.sum() - p).max() < 0.01
    if alpha == 1.0:
        assert np.allclose(p, 1 / 20)
    else:
        assert p[0] > 5 * p[-1]


def test_arrivals_have_the_rate_and_the_coefficient_of_variation():
    cfg = WorkloadConfig(num_adapters=1, num_requests=50000, rate=4.0, cv=3.0)
    gaps = np.diff([0.0] + [r.arrival_s for r in generate_requests(cfg, 64)])
    assert math.isclose(gaps.mean(), 1 / 4.0, rel_tol=0.05)
    assert math.isclose(gaps.std() / gaps.mean(), 3.0, rel_tol=0.1)
    burst = generate_requests(WorkloadConfig(num_adapters=1, num_requests=5, rate=math.inf), 64)
    assert [r.arrival_s for r in burst] == [0.0] * 5


def test_bad_workload_settings_name_the_value():
    with pytest.raises(ConfigError, match="rate must be > 0"):
        WorkloadConfig(num_adapters=1, num_requests=1, rate=0)
    with pytest.raises(ConfigError, match=r"input_range \[9, 9\)"):
        WorkloadConfig(num_adapters=1, num_requests=1, rate=1, input_range=(9, 9))
    with pytest.raises(ConfigError, match="popularity 'flat'"):
        WorkloadConfig(num_adapters=1, num_requests=1, rate=1, popularity="flat")


def test_preset_ranks_go_round_robin_and_a_larger_count_extends_a_smaller():
    s2 = preset_adapters(PRESETS["S2"], 9)
    assert [a.rank for a in s2] == [64, 32, 16, 8, 64, 32, 16, 8, 64]
    assert preset_adapters(PRESETS["S2"], 4) == s2[:4]
    assert {a.rank for a in preset_adapters(PRESETS["S1"], 5)} == {8}
    assert len({a.adapter_id for a in s2}) == 9 and len({a.path for a in s2}) == 9


# -- dummy adapters ------------------------------------------------------------------------

def test_dummy_adapters_are_seeded_contiguous_windows_in_host_memory():
    """Made from the path's rank and seed: contiguous [L, r, d_in] / [L, d_out, r] views of a
    shared bank, the same seed gives the same weights, another window other weights."""
    factory = DummyAdapterFactory(TINY, torch.float32, pin_memory=False, seed=3)
    load = dummy_adapter_loader(factory, max_rank=16, pin_memory=False)
    a0, a1, a2 = preset_adapters(PRESETS["S1"], 3)
    x0, x0_again, x1 = load(a0.adapter_id, a0.path), load("other", a0.path), \
        load(a1.adapter_id, a1.path)
    assert x0.module_ranks == {m: 8 for m in DUMMY_TARGETS}
    assert x0.num_bytes == adapter_bytes(TINY, 8, 4)
    assert x0.module_scales["q_proj"] == 2.0
    for m in DUMMY_TARGETS:
        (a, b), d_in_out = x0.weights[m], TINY.module_shape(m)
        assert a.shape == (TINY.num_layers, 8, d_in_out[0]) and a.is_contiguous()
        assert b.shape == (TINY.num_layers, d_in_out[1], 8) and b.is_contiguous()
        assert torch.equal(a, x0_again.weights[m][0])
        assert not torch.equal(a, x1.weights[m][0])
    assert parse_dummy_path(a2.path) == (8, a2.seed) and a2.seed % BANK_WINDOWS == 2
    assert parse_dummy_path("/some/folder") is None
    with pytest.raises(ConfigError, match="is not dummy-adapter://"):
        parse_dummy_path("dummy-adapter://rank8")
    with pytest.raises(ConfigError, match="rank 64; this pool allows 16"):
        load("big", preset_adapters(PRESETS["S2"], 1)[0].path)


def test_peft_folders_hold_the_host_memory_weights(tmp_path):
    """write_peft_adapters writes what the host-memory mode makes, as PEFT folders our
    loader accepts; writing again keeps a folder made from the same seeds."""
    factory = DummyAdapterFactory(TINY, torch.float32, pin_memory=False, seed=0)
    adapters = preset_adapters(PRESETS["S2"], 4)
    paths = write_peft_adapters(str(tmp_path), factory, adapters)
    for a in adapters:
        loaded = load_peft_adapter(a.adapter_id, paths[a.adapter_id], TINY, 64)
        made = factory.make(a.adapter_id, a.path, a.rank, a.seed)
        assert loaded.module_ranks == made.module_ranks
        assert loaded.module_scales == made.module_scales
        for m in DUMMY_TARGETS:
            assert torch.equal(loaded.weights[m][0], made.weights[m][0])
            assert torch.equal(loaded.weights[m][1], made.weights[m][1])
    weights = os.path.join(paths["s2-0"], "adapter_model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    write_peft_adapters(str(tmp_path), factory, adapters)
    assert os.stat(weights).st_mtime_ns == mtime


# -- the baselines -------------------------------------------------------------------------

ENGINE_ARGV = ["--model", "dummy-tiny", "--device", "cpu", "--dtype", "float32",
               "--max-lora-rank", "64", "--max-model-len", "40", "--max-num-seqs", "8",
               "--host-cache-gib", "1"]


def _tiny_s2_workload(num_requests: int = 5) -> Workload:
    cfg = WorkloadConfig(num_adapters=4, num_requests=num_requests, rate=math.inf,
                         input_range=(3, 14), output_range=(2, 7), seed=7)
    return Workload("tiny S2", cfg, generate_requests(cfg, TINY.vocab_size),
                    preset_adapters(PRESETS["S2"], 4))


def _engine_tokens(engine, w: Workload) -> list[list[int]]:
    return [engine.generate([list(r.prompt_token_ids)],
                            SamplingParams(max_new_tokens=r.output_len, ignore_eos=True),
                            [w.adapter_id(r)])[0] for r in w.requests]


def test_peft_baseline_generates_the_engines_tokens_on_the_same_weights(tmp_path):
    """HF PEFT, mixed-adapter batches, on LlamaForCausalLM built from the worker's dummy
    weights, greedy: the same tokens as the in-process engine, with the adapters made in
    host memory and with them read from the PEFT folders; one record per request."""
    w = _tiny_s2_workload()
    peft = baselines.run_peft(TINY, 0, torch.float32, torch.device("cpu"), w, batch_size=3)
    host = baselines.build_engine(ENGINE_ARGV, w.adapters)
    factory = DummyAdapterFactory(TINY, torch.float32, pin_memory=False, seed=0)
    paths = write_peft_adapters(str(tmp_path), factory, w.adapters)
    folders = baselines.build_engine(ENGINE_ARGV, w.adapters, peft_paths=paths)
    assert len({w.adapter_id(r) for r in w.requests}) > 1
    assert peft.outputs == _engine_tokens(host, w) == _engine_tokens(folders, w)
    metrics = driver.summarize(peft)
    assert metrics["num_completed"] == len(w.requests)
    assert metrics["num_output_tokens"] == w.num_output_tokens


def test_engine_run_sends_at_arrival_times_and_records_every_token():
    cfg = WorkloadConfig(num_adapters=4, num_requests=6, rate=50.0, input_range=(3, 14),
                         output_range=(2, 7), seed=1)
    w = Workload("tiny", cfg, generate_requests(cfg, TINY.vocab_size),
                 preset_adapters(PRESETS["S1"], 4))
    result = driver.run_engine(baselines.build_engine(ENGINE_ARGV, w.adapters), w)
    for rec, req in zip(result.records, w.requests):
        assert rec.completed and rec.num_output_tokens == req.output_len
        assert rec.sent_s >= req.arrival_s and rec.first_token_s <= rec.end_s
    assert result.stats["num_steps"] > 0
    assert result.wall_s >= max(r.end_s for r in result.records)


def test_roofline_of_llama_7b_leaves_adapters_the_issues_share():
    """At batch 64 with 1,000 adapters: rank 8 keeps about 96% of the base's decode roofline,
    ranks 64/32/16/8 about 85-89% (the extra adapter rows)."""
    cfg = WorkloadConfig(num_adapters=1000, num_requests=400, rate=40.0)
    reqs = generate_requests(cfg, LLAMA_7B.vocab_size)
    bw = 3.0e12
    base = baselines.decode_roofline(LLAMA_7B, 2, Workload("b", cfg, reqs), 64, bw)
    s1 = baselines.decode_roofline(
        LLAMA_7B, 2, Workload("s1", cfg, reqs, preset_adapters(PRESETS["S1"], 1000)), 64, bw)
    s2 = baselines.decode_roofline(
        LLAMA_7B, 2, Workload("s2", cfg, reqs, preset_adapters(PRESETS["S2"], 1000)), 64, bw)
    assert 0.95 < s1["output_tokens_per_s"] / base["output_tokens_per_s"] < 0.98
    assert 0.84 < s2["output_tokens_per_s"] / base["output_tokens_per_s"] < 0.90
    assert 12.5e9 < base["weight_bytes"] < 13.6e9
    assert base["adapter_bytes"] == 0 and 50 < s1["distinct_adapters"] <= 64
    assert math.isclose(base["step_s"], base["step_bytes"] / bw)


def test_serving_roofline_adds_prefill_flops_to_decode_bytes_at_the_batch_reached():
    """Three requests of 8 prompt and 5 output tokens on Llama-7B: prefill is every
    projection on 24 prompt tokens, causal attention and one lm_head row per request, at the
    GEMM rate; decode is the 12 tokens after each first one, 4 steps of batch 3, each at its
    bytes over the copy bandwidth."""
    cfg = WorkloadConfig(num_adapters=1, num_requests=3, rate=math.inf, input_range=(8, 9),
                         output_range=(5, 6))
    w = Workload("b", cfg, generate_requests(cfg, LLAMA_7B.vocab_size))
    bw, gemm = 3.0e12, 7.0e14
    roof = baselines.serving_roofline(LLAMA_7B, 2, w, 2.6, bw, gemm)
    projections = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o; gate, up, down
    flops = 3 * (2 * projections * 8 + 4 * 32 * 4096 * (8 * 9 / 2) + 2 * 32000 * 4096)
    assert roof["prefill_s"] == pytest.approx(flops / gemm)
    step = baselines.decode_roofline(LLAMA_7B, 2, w, 3, bw)["step_s"]
    assert roof["batch"] == 3 and roof["decode_s"] == pytest.approx(4 * step)
    assert roof["output_tokens_per_s"] == pytest.approx(15 / (flops / gemm + 4 * step))


def test_metrics_count_completed_requests_over_the_whole_wall_time():
    """Throughput = completed / wall (drain included); a failed request misses the SLO;
    TPOT = (end - first token) / (tokens - 1)."""
    records = [
        RequestRecord(0, "a", 4, 5, 0.0, 0.0, 1.0, 3.0, 5),
        RequestRecord(1, None, 4, 3, 0.5, 0.5, 7.5, 8.5, 3),
        RequestRecord(2, "a", 4, 3, 1.0, 1.0, None, None, 0, error="RuntimeError: boom"),
    ]
    m = driver.summarize(RunResult("r", "grpc", "S1", 1, records, wall_s=10.0,
                                   stats={"num_steps": 4}), slo_ttft_s=6.0)
    assert set(m) == set(driver.METRIC_KEYS)
    assert m["throughput_rps"] == 0.2 and m["output_tokens_per_s"] == 0.8
    assert m["num_failed"] == 1 and m["slo_attainment"] == pytest.approx(1 / 3)
    assert m["latency_mean_s"] == pytest.approx(5.5) and m["ttft_p50_s"] == pytest.approx(4.0)
    assert m["tpot_mean_s"] == pytest.approx((0.5 + 0.5) / 2)
    assert m["output_tokens_per_step"] == 2.0


def test_saturated_rate_counts_tokens_while_a_full_batch_is_in_flight():
    """Batch 2: saturated while two requests are in flight, [1, 4) and [6, 7); the tokens
    that came back then, over those 4 s."""
    def rec(i, sent, end, times):
        r = RequestRecord(i, None, 4, len(times), sent, sent, times[0], end, len(times))
        r.token_times = list(times)
        return r

    records = [rec(0, 0.0, 4.0, [0.5, 1.5, 2.5, 3.5]),   # in flight [0, 4)
               rec(1, 1.0, 7.0, [2.0, 3.0, 5.0, 6.5]),   # [1, 7)
               rec(2, 6.0, 9.0, [6.2, 6.8, 8.0, 8.5])]   # [6, 9)
    assert driver.saturated_intervals(records, 2) == [(1.0, 4.0), (6.0, 7.0)]
    seconds, rate = driver.saturated_rate(records, 2)
    assert seconds == 4.0
    # In [1, 4]: 1.5, 2.5, 3.5, 2.0, 3.0; in [6, 7]: 6.5, 6.2, 6.8.
    assert rate == pytest.approx(8 / 4.0)
    assert driver.saturated_rate(records, 4) == (0.0, pytest.approx(float("nan"), nan_ok=True))
    m = driver.summarize(RunResult("r", "grpc", "S1", 1, records, wall_s=9.0), 6.0,
                         saturation_batch=2)
    assert m["saturated_output_tokens_per_s"] == pytest.approx(2.0)


def test_repeated_settings_check_the_median_of_their_per_run_ratios():
    """--repeats 3: each check takes the ratio within each run (trial) and reports their
    median; a run cut short by the time limit drops out of the checks it is part of; the
    table shows the median and the range."""
    args = serving.build_parser().parse_args(
        [*TINY_COMMAND, "--adapter-counts", "2,8", "--skip", "peft,inprocess", "--repeats", "3"])
    plan = serving.make_plan(args, TINY)
    rps = {plan.base.name: [10.0, 12.0, 11.0], "S1 4 adapters": [9.5, 10.5, 10.0],
           "S2 4 adapters": [8.0, 9.0, 8.0], "S1 2 adapters": [9.6, 11.0, 10.6],
           "S1 8 adapters": [9.0, 10.4]}  # its third run was cut by --time-limit-s
    results = [RunResult(name, "grpc", None, 0, [], 1.0, trial=t,
                         metrics={"throughput_rps": x, "output_tokens_per_s": 7 * x},
                         roofline={"output_tokens_per_s": 100.0})
               for t in range(3) for name, xs in rps.items() if t < len(xs) for x in [xs[t]]]
    rows = {c["check"]: c for c in serving.checks(results, plan)}
    s1 = rows["S1 4 adapters vs base, req/s"]
    assert s1["runs"] == pytest.approx([0.95, 0.875, 10 / 11])
    assert s1["ours"] == pytest.approx(10 / 11) and s1["met"] is False  # under 93%
    assert s1["roofline"] == pytest.approx(1.0)
    counts = rows["8 vs 2 adapters, req/s"]
    assert counts["runs"] == pytest.approx([9.0 / 9.6, 10.4 / 11.0])
    assert counts["ours"] == pytest.approx((9.0 / 9.6 + 10.4 / 11.0) / 2)
    assert counts["met"] is False
    roofline = rows["base (no adapters) output tok/s vs its roofline at the batch reached"]
    assert roofline["ours"] == pytest.approx(0.77) and len(roofline["runs"]) == 3
    assert rows["gRPC vs in-process, S1 4 adapters, req/s"]["ours"] is None
    table = serving.checks_table(list(rows.values()))
    assert "| S1 4 adapters vs base, req/s | 90.9% (median of 3: 87.5%–95.0%) |" in table
    assert "| 8 vs 2 adapters, req/s | 94.1% (median of 2: 93.8%–94.5%) |" in table
    with pytest.raises(SystemExit):
        serving.build_parser().parse_args([*TINY_COMMAND, "--repeats", "0"])


# -- the one command -----------------------------------------------------------------------

TINY_COMMAND = ["--model", "dummy-tiny", "--device", "cpu", "--num-adapters", "4",
                "--num-requests", "6", "--rate", "100000", "--input-range", "4", "16",
                "--output-range", "8", "16", "--warmup-requests", "2", "--max-num-seqs", "4"]
"""Six requests arriving within microseconds against four sequences, each at least 8 tokens
long: more than four are in flight until two have ended, however fast the machine is (at
100 req/s an idle machine finished each before the fourth arrived)."""


def _run_serving(out_dir, *extra: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "slora.bench.serving", *TINY_COMMAND, "--out", str(out_dir),
         *extra], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out_dir, "serving.json")) as f:
        return json.load(f), proc.stdout


@pytest.mark.slow
def test_one_command_runs_the_benchmark_and_its_baselines_and_prints_the_table(tmp_path):
    """Every phase on the CPU: in-process engine, the stack as processes with host-memory
    adapters (base, S1, S2, two more adapter counts), PEFT, roofline; every request served,
    every metric in the JSON, and the table of targets printed last."""
    payload, stdout = _run_serving(tmp_path, "--adapter-counts", "2,8", "--peft-requests", "3")
    names = [(r["via"], r["name"]) for r in payload["results"]]
    assert names == [("engine", "S1 4 adapters, in-process"), ("grpc", "base (no adapters)"),
                     ("grpc", "S1 4 adapters"), ("grpc", "S2 4 adapters"),
                     ("grpc", "S1 2 adapters"), ("grpc", "S1 8 adapters"),
                     ("peft", "PEFT sample of S1")]
    for r in payload["results"]:
        assert set(driver.METRIC_KEYS) <= set(r["metrics"]), r["name"]
        assert r["metrics"]["num_failed"] == 0 and r["metrics"]["num_completed"] > 0, r["name"]
        assert all(rec["num_output_tokens"] == rec["output_len"] for rec in r["records"])
        if r["via"] != "peft":
            assert r["roofline"]["output_tokens_per_s"] > 0
    grpc_runs = [r for r in payload["results"] if r["via"] == "grpc"]
    assert all(r["stats"]["num_steps"] > 0 for r in grpc_runs)
    for key in ("command", "date", "device", "copy_bytes_per_s", "engine_argv", "checks"):
        assert payload[key], key
    checks = [c["check"] for c in payload["checks"]]
    assert checks == ["S1 4 adapters vs base, req/s", "S2 4 adapters vs base, req/s",
                      "8 vs 2 adapters, req/s", "S1 4 adapters vs PEFT (its sample), req/s",
                      "gRPC vs in-process, S1 4 adapters, req/s",
                      "base (no adapters) output tok/s vs its roofline at the batch reached"]
    assert all(c["ours"] is not None for c in payload["checks"])
    last = stdout.strip().splitlines()
    assert last[-8].startswith("| target | ours | roofline | needed |")
    assert last[-1].startswith(
        "| base (no adapters) output tok/s vs its roofline at the batch reached |")
    for r in payload["results"]:
        if r["via"] != "peft":
            assert r["metrics"]["saturated_s"] > 0, r["name"]
    assert "| base (no adapters) | grpc | 0 |" in stdout
    for name in ("serving.md", "stack.log"):
        assert os.path.getsize(tmp_path / name) > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("throughput_vs_adapters.png", "latency.png"):
        assert os.path.getsize(tmp_path / name) > 0


@pytest.mark.slow
def test_repeats_run_the_stack_settings_interleaved(tmp_path):
    """--repeats 2: base, S1 and the count run in that order twice through one stack; every
    row of the table names its run; the checks hold two runs each."""
    payload, stdout = _run_serving(tmp_path, "--presets", "S1", "--adapter-counts", "2",
                                   "--skip", "peft,inprocess", "--repeats", "2")
    order = [(r["name"], r["trial"]) for r in payload["results"]]
    assert order == [(name, trial) for trial in (0, 1) for name in
                     ("base (no adapters)", "S1 4 adapters", "S1 2 adapters")]
    assert all(r["metrics"]["num_failed"] == 0 for r in payload["results"])
    assert "| S1 2 adapters (run 2) | grpc | 2 |" in stdout
    counts = next(c for c in payload["checks"] if c["check"] == "4 vs 2 adapters, req/s")
    assert len(counts["runs"]) == 2 and "(median of 2: " in stdout


@pytest.mark.slow
def test_peft_folder_mode_uploads_the_adapters_through_the_api(tmp_path):
    """--adapter-mode peft writes PEFT folders and uploads them to the frontend; the stack
    then serves them."""
    payload, _ = _run_serving(tmp_path, "--adapter-mode", "peft", "--presets", "S2",
                              "--skip", "inprocess,base,counts,peft")
    [result] = payload["results"]
    assert result["name"] == "S2 4 adapters" and result["metrics"]["num_failed"] == 0
    with open(tmp_path / "stack.log") as f:
        log = f.read()
    assert log.count("registered adapter") >= 4


def test_step_breakdown_sorts_every_step_and_times_its_phases(capsys, monkeypatch):
    """bench/step_breakdown.py over a tiny S1 with more adapters than slots: one table per
    workload, every step in one of its rows, and steps that load adapters among them."""
    from slora.bench import step_breakdown
    from slora.worker import executor

    monkeypatch.setattr(executor, "sample", executor.sample)  # restored after the test
    step_breakdown.main(["--model", "dummy-tiny", "--device", "cpu", "--presets", "S1",
                         "--num-adapters", "8", "--adapter-counts", "", "--skip", "base",
                         "--max-adapter-slots", "3", "--num-requests", "12",
                         "--input-range", "4", "16", "--output-range", "2", "8",
                         "--max-num-seqs", "4"])
    out = capsys.readouterr().out
    header, = [line for line in out.splitlines() if line.startswith("## S1 8 adapters")]
    num_steps = int(header.split(": ")[1].split(" steps")[0])
    rows = [line.split(" | ") for line in out.splitlines()
            if line.startswith(("| decode", "| mixed"))]
    assert sum(int(r[1]) for r in rows) == num_steps
    assert any("loads" in r[0] and float(r[-1].rstrip(" |")) >= 1 for r in rows), out


def test_paper_table_prints_ours_beside_s_loras_a100_figures():
    """--trace paper's last table: each of our runs beside S-LoRA's own figure for the same
    preset and adapter count, with the ratio."""
    from slora.bench.paper_trace import paper_table

    results = [RunResult("S1 1000 adapters", "grpc", "S1", 1000, [], 1.0,
                         metrics={"throughput_rps": 9.55, "latency_mean_s": 20.0,
                                  "ttft_mean_s": 0.5}),
               RunResult("S2 5 adapters", "grpc", "S2", 5, [], 1.0,
                         metrics={"throughput_rps": 7.48, "latency_mean_s": 29.0,
                                  "ttft_mean_s": 1.0})]
    table = paper_table(results)
    assert "| S1 1000 adapters | 9.55 | 7.64 | 1.25x | 20.00 | 25.93 | 0.50 | 1.90 | – |" in table
    assert "| S2 5 adapters | 7.48 | 7.48 | 1.00x |" in table and "vLLM-packed 2.04" in table


def test_serving_help_prints():
    """--help renders every flag's help (a stray % in one breaks it)."""
    text = serving.build_parser().format_help()
    assert "--trace {capacity,paper}" in text and "60% of the largest adapter count" in text
