"""The serving benchmark: the paper's workload through the whole stack, and its baselines, in
one command that prints one table last.

    python -m slora.bench.serving --out DIR      # on a GPU: dummy Llama-2-7B, S1 and S2
                                                 # with 1,000 adapters, S1 with 5 and 2,000
    python -m slora.bench.serving --trace paper --out DIR
                                                 # S-LoRA's Table 3 trace, beside its figures
    python -m slora.bench.serving --model dummy-tiny --device cpu --num-adapters 4 \\
        --adapter-counts 2,8 --num-requests 6 --input-range 4 16 --output-range 2 8 \\
        --max-num-seqs 8 --out DIR               # every phase, tiny, on a CPU (the test's)

Two traces. `capacity` (the default) sends each setting enough requests that most adapters
are touched (>= 60% of the largest count, in expectation; the checks print the share) at a
rate above what the server sustains, so throughput measures capacity. `paper` is S-LoRA's own
trace for its Table 3 (bench/paper_trace.py: 10 req/s for 120 s, seed 42, the same requests
as S-LoRA's generator), each preset over 5, 100, 1,000 and 2,000 adapters, and prints our
figures beside the paper's A100 ones. The worker sizes its pool and its batch from the GPU's
memory unless --pool-gib / --num-pages / --max-num-seqs say otherwise.

In order, on one device, with the same requests everywhere (bench/workload.py):
1. the copy bandwidth and the GEMM rate of the device (for the roofline);
2. the in-process Engine (no gRPC) on the first preset's workload, then freed;
3. the stack as real processes (embedded Redis, the worker with dummy weights, the scheduler,
   the frontend), its adapters registered (host-memory mode: records written to the
   registry, weights made from seeds in the worker's host cache; peft mode: PEFT folders
   uploaded through the API), then through the SDK: the base model with no adapters; each
   preset with --num-adapters adapters; the first preset with each of --adapter-counts
   (with --repeats N, that sequence N times over, and each check the median of its N
   per-run ratios);
4. Hugging Face PEFT on the first --peft-requests requests of the first preset's workload;
5. the roofline of each run (bench/baselines.py `serving_roofline`): its prefill FLOPs at the
   measured GEMM rate plus its decode steps' bytes at the copy bandwidth, at the batch the
   run reached (its output tokens per step);
6. the cores each process kept busy over each run through the stack (CPU seconds from
   /proc over the wall time; `client` is this process's SDK streams): the table names the
   busiest event loop (frontend, scheduler, client; each one thread), the run's limit when
   near 1.0.

The in-process engine and the stack first serve a few short warm-up requests, not counted.
Results go to --out: serving.json (every metric, every request), serving.md (the tables), two
PNG plots (throughput against the number of adapters; latency distributions) and stack.log
(the processes' output). The last thing printed is the table of the issue's targets
(bench/serving_checks.py), then with --trace paper the table beside the paper's. A phase
that fails is reported and the others still run (exit status 1); --time-limit-s stops
starting new settings once the run has taken that long.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from slora.bench import baselines, driver, plots, tp_info
from slora.bench.paper_trace import PAPER_COUNTS, paper_config
from slora.bench.serving_checks import (  # noqa: F401 (tests and callers use them from here)
    PRESET_TARGETS, TOUCHED_TARGET, checks, checks_table, report, touched_share,
)
from slora.bench.stack import Stack, log, register_adapters, start_stack
from slora.bench.workload import (
    PRESETS, DummyAdapter, DummyAdapterFactory, Workload, WorkloadConfig, adapter_bytes,
    adapter_popularity, generate_requests, preset_adapters, write_peft_adapters,
)
from slora.common.config import ModelConfig
from slora.models.registry import dummy_model_config
from slora.worker.args import pool_page_bytes
from slora.worker.memory_plan import prefer_expandable_segments
WARMUP_OUTPUT_LEN = 16
CAPACITY_COUNTS = "5,2000"
"""--adapter-counts of the capacity mode."""


# -- the command line ----------------------------------------------------------------------

def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slora.bench.serving",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("workload (the paper's; bench/workload.py)")
    g.add_argument("--trace", default="capacity", choices=["capacity", "paper"],
                   help="capacity: the flags below, enough requests that most adapters are "
                        "touched; paper: S-LoRA's own Table 3 trace (10 req/s for 120 s, "
                        "seed 42; bench/paper_trace.py), each preset over each of "
                        f"--adapter-counts (default {','.join(map(str, PAPER_COUNTS))}), "
                        "printed beside the paper's A100 figures")
    g.add_argument("--presets", default="S1,S2",
                   help=f"comma-separated, of {', '.join(PRESETS)}; the first one is also "
                        "the in-process, PEFT and adapter-count runs' workload")
    g.add_argument("--num-adapters", type=int, default=1000)
    g.add_argument("--adapter-counts", default=None,
                   help="more adapter counts for the first preset (throughput against the "
                        f"number of adapters; default {CAPACITY_COUNTS}); empty for none")
    g.add_argument("--num-requests", type=int, default=None,
                   help="requests per setting (default: enough that, in expectation, "
                        f"{TOUCHED_TARGET * 100:.0f}%% of the largest adapter count are touched, "
                        "rounded up to 100s, at least 200)")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds of arrivals instead: num_requests = rate * duration (the "
                        "paper's way)")
    g.add_argument("--rate", type=float, default=40.0,
                   help="total arrival rate, requests/s ('inf': all at once); above the "
                        "system's capacity, throughput measures that capacity")
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gaps")
    g.add_argument("--alpha", type=float, default=1.0, help="power-law popularity exponent")
    g.add_argument("--popularity", default="power", choices=["power", "zipf"])
    g.add_argument("--zipf-s", type=float, default=1.1)
    g.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    g.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    g.add_argument("--seed", type=int, default=42, help="of the workload (the paper's)")
    g.add_argument("--slo-ttft", type=float, default=driver.DEFAULT_SLO_TTFT_S,
                   help="first-token SLO, seconds")
    g = p.add_argument_group("model and engine (the worker's flags, shared by the engine)")
    g.add_argument("--model", default=None,
                   help="default: the presets' model (dummy-llama-7b); dummy-tiny for CI")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16",
                                                       "bfloat16"])
    g.add_argument("--num-pages", type=int, default=None,
                   help="pool pages (default: --pool-gib on CUDA; the engine's default on CPU)")
    g.add_argument("--pool-gib", type=float, default=None,
                   help="pool size on CUDA, GiB (default: the worker sizes it from memory)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: the worker's (sized from the pool)")
    g.add_argument("--max-num-batched-tokens", type=int, default=4096)
    g.add_argument("--max-adapter-slots", type=int, default=None,
                   help="deprecated cap on resident adapters (default: none, the pool's "
                        "pages are the only bound)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"])
    g.add_argument("--weights-seed", type=int, default=0, help="of the dummy weights")
    g.add_argument("--tensor-parallel-size", type=_at_least_one, default=1,
                   help="worker ranks, one per GPU (cuda:0..N-1), for the stack and the "
                        "in-process engine; recorded with the ranks' GPUs")
    g.add_argument("--tp-profile", action="store_true",
                   help="time the worker group's collectives per step kind in the stack "
                        "(worker/tp_profile.py; steps run eagerly): tp_profile.json and a "
                        "table; the stack's figures are then not the eager-free ones")
    g = p.add_argument_group("adapters and baselines")
    g.add_argument("--adapter-mode", default="host", choices=["host", "peft"],
                   help="host: made from seeds in the worker's host memory, records written "
                        "to the registry; peft: PEFT folders uploaded through the API")
    g.add_argument("--peft-requests", type=int, default=8,
                   help="size of the PEFT baseline's sample")
    g.add_argument("--peft-batch-size", type=int, default=8)
    g.add_argument("--skip", default="",
                   help="comma-separated phases to leave out: inprocess, base, counts, "
                        "peft")
    g.add_argument("--warmup-requests", type=int, default=4)
    g.add_argument("--repeats", type=_at_least_one, default=1,
                   help="runs of each setting through the stack, interleaved (base, presets, "
                        "counts, then again); each check is the median of its per-run ratios")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench-out", help="folder for the results")
    g.add_argument("--time-limit-s", type=float, default=0.0,
                   help="start no phase or setting after this many seconds (0: no limit); "
                        "what was measured is still reported")
    g.add_argument("--work-dir", default=None,
                   help="folder for Redis data and adapter files (default: a temporary one)")
    return p


@dataclasses.dataclass
class Plan:
    """Every workload of the run, built once from the flags."""

    model: ModelConfig
    main: list[Workload]
    """One per preset, --num-adapters adapters."""
    base: Workload | None
    counts: list[Workload]
    """The first preset with each of --adapter-counts."""
    peft: Workload | None
    adapters: list[DummyAdapter]
    """Every adapter any workload names (the largest count of each preset)."""


def make_plan(args, model: ModelConfig) -> Plan:
    presets = [PRESETS[name.strip().upper()] for name in args.presets.split(",") if name.strip()]
    paper = args.trace == "paper"
    counts_flag = args.adapter_counts if args.adapter_counts is not None else (
        ",".join(map(str, PAPER_COUNTS)) if paper else CAPACITY_COUNTS)
    count_list = [int(c) for c in counts_flag.split(",") if c.strip()]
    if args.duration is not None:
        num_requests = int(args.rate * args.duration)
    else:
        num_requests = args.num_requests or requests_to_touch(
            max([args.num_adapters] + count_list), args.alpha, TOUCHED_TARGET)

    def config(num_adapters: int) -> WorkloadConfig:
        if paper:
            return paper_config(num_adapters)
        return WorkloadConfig(
            num_adapters=num_adapters, num_requests=num_requests, rate=args.rate, cv=args.cv,
            alpha=args.alpha, popularity=args.popularity, zipf_s=args.zipf_s,
            input_range=tuple(args.input_range), output_range=tuple(args.output_range),
            seed=args.seed)

    def workload(preset, n: int) -> Workload:
        cfg = config(n)
        return Workload(f"{preset.name} {n} adapters", cfg,
                        generate_requests(cfg, model.vocab_size), preset_adapters(preset, n))

    skip = skipped_phases(args)
    if paper:
        # The paper's table only: each preset over each count, through the stack.
        main = [workload(p, n) for p in presets for n in count_list]
        return Plan(model, main, None, [], None, _largest_adapters(main))
    main = [workload(p, args.num_adapters) for p in presets]
    first = main[0]
    base = None if "base" in skip else Workload("base (no adapters)", first.config,
                                                first.requests)
    counts = [] if "counts" in skip else [
        workload(presets[0], c) for c in count_list]
    peft = None
    if "peft" not in skip and args.peft_requests > 0:
        peft = Workload(f"PEFT sample of {presets[0].name}", first.config,
                        first.requests[:args.peft_requests], first.adapters)
    return Plan(model, main, base, counts, peft, _largest_adapters(main + counts))


def _largest_adapters(workloads: list[Workload]) -> list[DummyAdapter]:
    largest: dict[str, DummyAdapter] = {}
    for w in workloads:
        for a in w.adapters:
            largest.setdefault(a.adapter_id, a)
    return list(largest.values())


def requests_to_touch(num_adapters: int, alpha: float, share: float) -> int:
    """Requests for which the expected share of `num_adapters` adapters named at least once,
    under Power(alpha) popularity, reaches `share` (+2 points, for the draw's spread),
    rounded up to 100s; at least 200."""
    cfg = WorkloadConfig(num_adapters=num_adapters, num_requests=1, rate=1.0, alpha=alpha)
    p = adapter_popularity(cfg)
    n = 200
    while float(np.mean(1.0 - (1.0 - p) ** n)) < share + 0.02 and n < 10**6:
        n += 100
    return n


def skipped_phases(args) -> set[str]:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.trace == "paper":
        skip |= {"inprocess", "base", "counts", "peft"}
    return skip


def warmup_workload(w: Workload, num: int) -> Workload:
    """The first `num` requests of `w`, all at t = 0, with short outputs."""
    reqs = [dataclasses.replace(r, arrival_s=0.0, output_len=min(r.output_len, WARMUP_OUTPUT_LEN))
            for r in w.requests[:num]]
    return Workload(f"warm-up {w.name}", w.config, reqs, w.adapters)


def engine_argv(args, plan: Plan, device: str, dtype: str) -> list[str]:
    """The worker's flags; the in-process engine parses the same ones."""
    model = plan.model
    max_rank = max([a.rank for a in plan.adapters] or [8])
    max_len = max(w.config.max_context_len for w in plan.main) + 1
    dtype_size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    cache_bytes = sum(adapter_bytes(model, a.rank, dtype_size) for a in plan.adapters)
    argv = ["--model", args.model, "--device", device, "--dtype", dtype,
            "--max-lora-rank", str(max_rank),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-model-len", str(max_len), "--seed", str(args.weights_seed),
            "--tensor-parallel-size", str(args.tensor_parallel_size),
            "--host-cache-gib", f"{max(1.0, 1.1 * cache_bytes / 2**30):.2f}"]
    if args.max_adapter_slots is not None:
        argv += ["--max-adapter-slots", str(args.max_adapter_slots)]
    if args.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(args.max_num_seqs)]
    num_pages = args.num_pages
    if num_pages is None and args.pool_gib is not None and device.startswith("cuda"):
        page_bytes = pool_page_bytes(model, dtype_size, args.tensor_parallel_size)
        num_pages = int(args.pool_gib * 2**30 // page_bytes)
    if num_pages is not None:
        argv += ["--num-pages", str(num_pages)]
    return argv


# -- the run -------------------------------------------------------------------------------

def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class Run:
    """One benchmark run: the settings, the measured results, and the phases that make them.
    A phase that fails is logged and recorded in `errors`; the others still run, and the
    report shows what was measured."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.skip = skipped_phases(args)
        first = PRESETS[args.presets.split(",")[0].strip().upper()]
        args.model = args.model or first.model
        self.model = dummy_model_config(args.model)
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = args.dtype if args.dtype != "auto" else (
            "bfloat16" if self.device.startswith("cuda") else "float32")
        self.torch_dtype = getattr(torch, self.dtype)
        self.dtype_size = torch.empty((), dtype=self.torch_dtype).element_size()
        self.plan = make_plan(args, self.model)
        self.presets = [w.name.split()[0] for w in self.plan.main]
        self.engine_argv = engine_argv(args, self.plan, self.device, self.dtype)
        self.ranks = sorted({a.rank for a in self.plan.adapters})
        self.results: list[driver.RunResult] = []
        self.errors: list[str] = []
        """Phases that failed."""
        self.skipped: list[str] = []
        """Phases and settings left out."""
        self.copy_bw = math.nan
        self.gemm_rate = math.nan
        self.max_num_seqs = args.max_num_seqs
        """The server's, once known (the worker sizes it unless --max-num-seqs says)."""
        self.peft_paths: dict[str, str] | None = None
        self.profile_path: str | None = None
        """The stack's collective profile (--tp-profile)."""

    # -- bookkeeping

    def out_of_time(self, what: str) -> bool:
        limit = self.args.time_limit_s
        if limit and time.perf_counter() - self.t0 > limit:
            log(f"skipped {what}: past --time-limit-s {limit:.0f}")
            self.skipped.append(f"{what} (past --time-limit-s {limit:.0f})")
            return True
        return False

    def phase(self, name: str, fn) -> None:
        if self.out_of_time(f"phase {name}"):
            return
        log(f"phase: {name}")
        try:
            fn()
        except Exception as e:
            log(f"phase {name} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            self.errors.append(f"{name}: {type(e).__name__}: {e}")
        finally:
            free_device_memory()

    def keep(self, result: driver.RunResult, w: Workload, preset: str | None) -> None:
        result.name, result.preset = w.name, preset
        m = driver.summarize(result, self.args.slo_ttft,
                             None if result.via == "peft" else self.max_num_seqs)
        if result.via != "peft":
            batch = m["output_tokens_per_step"]
            result.roofline = baselines.serving_roofline(
                self.model, self.dtype_size, w, batch if batch == batch else 1.0,
                self.copy_bw, self.gemm_rate)
        self.results.append(result)
        m = result.metrics
        run = f" (run {result.trial + 1})" if self.args.repeats > 1 and result.via == "grpc" else ""
        log(f"{result.name}{run} via {result.via}: {m['throughput_rps']:.2f} req/s, "
            f"{m['output_tokens_per_s']:.0f} output tok/s, {m['num_failed']} failed")

    # -- the phases

    def measure_bandwidth(self) -> None:
        self.copy_bw = baselines.measure_copy_bandwidth(torch.device(self.device))
        self.gemm_rate = baselines.measure_gemm_rate(torch.device(self.device), self.torch_dtype)
        log(f"copy bandwidth {self.copy_bw / 1e9:.0f} GB/s (read + write), GEMM "
            f"{self.gemm_rate / 1e12:.1f} TFLOP/s")

    def write_peft_folders(self, work_dir: str) -> None:
        start = time.perf_counter()
        factory = DummyAdapterFactory(self.model, self.torch_dtype, pin_memory=False,
                                      seed=self.args.weights_seed)
        self.peft_paths = write_peft_adapters(os.path.join(work_dir, "peft"), factory,
                                              self.plan.adapters)
        log(f"wrote {len(self.peft_paths)} PEFT folders in {time.perf_counter() - start:.1f} s")

    def in_process(self) -> None:
        engine = baselines.build_engine(self.engine_argv, self.plan.adapters, self.peft_paths,
                                        backend=self.args.backend, prepare_ranks=self.ranks)
        w = self.plan.main[0]
        self.max_num_seqs = engine.config.scheduler.max_num_seqs
        driver.run_engine(engine, warmup_workload(w, self.args.warmup_requests))
        result = driver.run_engine(engine, w, label=f"{w.name} in-process")
        del engine
        self.keep(result, w, self.presets[0])
        result.name = f"{w.name}, in-process"
        free_device_memory()
        if self.device.startswith("cuda"):
            log(f"in-process engine freed: {torch.cuda.memory_allocated() / 2**30:.1f} GiB "
                "still allocated in this process")

    def through_the_stack(self, work_dir: str) -> None:
        plan = self.plan
        stack = Stack(os.path.join(self.args.out, "stack.log"))
        try:
            with tp_info.profiling(self.args.out, self.args.tp_profile) as path:
                self.profile_path = path
                target = start_stack(stack, work_dir,
                                     self.engine_argv + ["--backend", self.args.backend],
                                     self.ranks)
            register_adapters(stack, target, self.model, plan.adapters, self.args.adapter_mode,
                              self.peft_paths, self.dtype_size)
            self.max_num_seqs = stack.stats().get("max_num_seqs", self.max_num_seqs)
            for w in plan.main:
                driver.run_grpc(target, warmup_workload(w, self.args.warmup_requests),
                                stats_fn=stack.stats)
            runs = ([(plan.base, None)] if plan.base else []) + list(zip(plan.main, self.presets))
            runs += [(w, self.presets[0]) for w in plan.counts]
            # Repeats interleave, so that a drift of the machine spreads over every setting
            # and the settings a check compares run next to each other.
            for trial, (w, preset) in ((t, run) for t in range(self.args.repeats)
                                       for run in runs):
                if self.out_of_time(w.name if trial == 0 else f"{w.name} (run {trial + 1})"):
                    break
                cpu_before, client_before = stack.cpu_seconds(), time.process_time()
                result = driver.run_grpc(target, w, stats_fn=stack.stats)
                result.trial = trial
                cpu = stack.cpu_seconds()
                result.cpu_cores = {
                    **{n: round((cpu[n] - cpu_before[n]) / result.wall_s, 2)
                       for n in cpu if n in cpu_before and n != "redis"},
                    "client": round((time.process_time() - client_before) / result.wall_s, 2)}
                self.keep(result, w, preset)
                log("cores busy over the run: " + ", ".join(
                    f"{n} {c:.2f}" for n, c in result.cpu_cores.items()))
        finally:
            stack.stop()

    def peft(self) -> None:
        try:
            result = baselines.run_peft(self.model, self.args.weights_seed, self.torch_dtype,
                                        torch.device(self.device), self.plan.peft,
                                        self.args.peft_batch_size)
        except ImportError as e:
            log(f"PEFT baseline skipped: {e} (pip install peft transformers)")
            self.skipped.append(f"PEFT ({e})")
            return
        self.keep(result, self.plan.peft, self.presets[0])

    def run(self) -> dict:
        """Runs every phase; returns the JSON payload."""
        args = self.args
        os.makedirs(args.out, exist_ok=True)
        work_dir = args.work_dir or tempfile.mkdtemp(prefix="slora-bench-")
        os.makedirs(work_dir, exist_ok=True)
        log(f"{args.model} on {device_name(self.device)} ({self.dtype}); "
            f"{len(self.plan.main[0].requests)} requests per setting at {args.rate} req/s; "
            f"work dir {work_dir}")
        self.measure_bandwidth()
        if args.adapter_mode == "peft":
            self.phase("writing PEFT folders", lambda: self.write_peft_folders(work_dir))
        if "inprocess" not in self.skip:
            self.phase("in-process engine", self.in_process)
        self.phase("the stack (gRPC)", lambda: self.through_the_stack(work_dir))
        if self.plan.peft is not None:
            self.phase("Hugging Face PEFT", self.peft)
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        return {
            "command": " ".join(["python -m slora.bench.serving"] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(self.device), "torch": torch.__version__,
            "dtype": self.dtype, "model": args.model, "copy_bytes_per_s": self.copy_bw,
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpus": tp_info.rank_devices(self.device, args.tensor_parallel_size),
            "tp_profile": tp_info.read_profile(self.profile_path),
            "gemm_flops_per_s": self.gemm_rate, "max_num_seqs": self.max_num_seqs,
            "engine_argv": self.engine_argv, "args": vars(args),
            "wall_s": time.perf_counter() - self.t0, "errors": self.errors, "skipped": self.skipped,
            "results": [r.to_json() for r in self.results],
            "checks": checks(self.results, self.plan),
        }


def main(argv: list[str] | None = None) -> int:
    prefer_expandable_segments()  # the in-process engine's and the worker's (it inherits)
    args = build_parser().parse_args(argv)
    run = Run(args)
    payload, results = run.run(), run.results
    driver.write_json(os.path.join(args.out, "serving.json"), payload)
    for path in plots.plot_all(results, args.out):
        log(f"wrote {path}")
    print(report(payload, results, args.out), flush=True)
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
