"""Decode-step time of the worker against its roofline, with CUDA graphs and without.

    python bench/decode_step.py [--model dummy-llama-7b] [--out DIR] [--batches 1,8,...,256]
                                [--steps 10]
    python bench/decode_step.py --plot DIR/decode_step.json     # redraw the PNG from JSON

A dummy model (default Llama-2-7B; any `dummy-<family>-<size>` preset, e.g.
dummy-qwen2.5-7b, dummy-mistral-7b, dummy-qwen3-8b) in bf16 on the GPU, pool max rank 64,
max_model_len 2048. For each batch size b and adapter mode (none; b distinct rank-16
adapters on q, k, v, o, the paper's targets), b requests sit at context 512: adopted by the
worker as if prefilled (`Worker.adopt_request`), their K/V pages holding random values. The
worker then runs real decode step commands (`Worker.execute`: the host builds the batch,
the GPU runs the step, sampling brings the tokens back), timed on the host clock around
execute, median of `--steps` after two warm-up steps; once replaying CUDA graphs, once
eagerly, each on fresh requests. "graph replay" is the GPU time of the captured graph alone
(CUDA events around replays, no host work or sampling).

Roofline: the bytes a decode step must read, over the copy bandwidth measured in the same run
(a 1 GiB device-to-device copy, bytes read + written): every weight once (the seven
projections of each layer, lm_head, the norms), each request's K and V at every layer for its
mean context over the timed steps, and each distinct adapter's rows (rank x (d_in + d_out) per
module per layer).

The adapters are loaded through the worker's own path (pinned host memory, side-stream copy,
`UnifiedPool.commit_loads`) and the load rate is printed. At batch 256 the K/V of 256 x 524
tokens (69 GB) does not fit beside the weights and adapters on an 80 GB GPU: the requests'
page lists then wrap around the pages there are, so some pages serve two requests. Each layer
still reads 256 x 524 pages' K/V (2 GiB, far more than L2), so the bytes moved are the same.

Prints one table last; with --out, writes decode_step.md, decode_step.json and, with
matplotlib, decode_step.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# At batch 256 the pool fills the memory the weights leave, and with the default allocator
# about 5 GiB stays reserved outside the CUDA graphs' pool, so capture runs out of memory
# (H100 80 GB). With expandable segments the allocator can hand that memory on.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

BATCHES = (1, 8, 16, 32, 64, 128, 256)
CONTEXT_LEN = 512
ADAPTER_RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_LORA_RANK = 64
MAX_MODEL_LEN = 2048
WARMUP_STEPS = 2
LOADS_PER_STEP = 16
BANK_WINDOWS = 32
"""Distinct weight windows of the adapters' host bank (adapter i takes window i % 32): their
rows in the pool are distinct pages either way."""


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, read + written, median of 20."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def make_adapters(model, num: int, dtype):
    """`num` LoraAdapters of rank 16 on q, k, v, o whose weights are pinned host views into
    one seeded bank per module."""
    from slora.adapter_store import LoraAdapter

    gen = torch.Generator().manual_seed(0)
    L = model.num_layers
    banks = {}
    for m in TARGETS:
        d_in, d_out = model.module_shape(m)
        banks[m] = ((torch.randn(L + BANK_WINDOWS, ADAPTER_RANK, d_in, generator=gen) * 0.02)
                    .to(dtype).pin_memory(),
                    (torch.randn(L + BANK_WINDOWS, d_out, ADAPTER_RANK, generator=gen) * 0.02)
                    .to(dtype).pin_memory())
    adapters = {}
    for i in range(num):
        w = i % BANK_WINDOWS
        adapters[f"a{i}"] = LoraAdapter(
            adapter_id=f"a{i}", path=f"bench://a{i}", base_model_name=model.name,
            module_ranks={m: ADAPTER_RANK for m in TARGETS},
            module_scales={m: 2.0 for m in TARGETS}, rank=ADAPTER_RANK,
            lora_alpha=2.0 * ADAPTER_RANK, use_rslora=False,
            layer_ranks={m: (ADAPTER_RANK,) * L for m in TARGETS},
            layer_scales={m: (2.0,) * L for m in TARGETS},
            weights={m: (a[w:w + L], b[w:w + L]) for m, (a, b) in banks.items()})
    return adapters


def step_bytes(model, batch: int, context: float, num_adapters: int) -> dict[str, float]:
    """Bytes one decode step must read (bf16)."""
    L, H = model.num_layers, model.hidden_size
    projections = sum(d_in * d_out for d_in, d_out in
                      map(model.module_shape, ("q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj")))
    weights = 2 * (L * (projections + 2 * H) + model.vocab_size * H + H + batch * H)
    kv = 2 * batch * context * L * 2 * model.kv_dim
    adapters = 2 * num_adapters * ADAPTER_RANK * L * sum(
        sum(model.module_shape(m)) for m in TARGETS)
    return {"weights": weights, "kv": kv, "adapters": adapters,
            "total": weights + kv + adapters}


def dense_gemms_s(model, batch: int, dtype=torch.bfloat16, reps: int = 10) -> float:
    """Seconds cuBLAS (torch.mm) takes for one decode step's dense GEMMs alone at `batch`
    tokens: every layer's four fused projections (qkv, o, gate_up, down) and lm_head, back to
    back in one CUDA graph (no launch gaps, nothing else on the GPU), median of `reps` replays.
    Two layers' weights alternate, so no GEMM finds its weight in L2. The weight bytes over
    this time say what rate the library reaches at these shapes: the floor under the step's
    GEMMs, beside the copy bandwidth the roofline assumes."""
    H, L = model.hidden_size, model.num_layers
    q, k, v, o, g, u, d = (model.module_shape(m) for m in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    shapes = [(H, q[1] + k[1] + v[1]), o, (H, g[1] + u[1]), d]
    gen = torch.Generator(device="cuda").manual_seed(3)
    layers = [[torch.randn(n_in, n_out, generator=gen, device="cuda", dtype=dtype) * 0.02
               for n_in, n_out in shapes] for _ in range(2)]
    head = torch.randn(H, model.vocab_size, generator=gen, device="cuda", dtype=dtype) * 0.02
    xs = {n_in: torch.randn(batch, n_in, generator=gen, device="cuda", dtype=dtype)
          for n_in, _ in shapes}
    outs = [torch.empty(batch, n_out, device="cuda", dtype=dtype) for _, n_out in shapes]
    logits = torch.empty(batch, model.vocab_size, device="cuda", dtype=dtype)

    def step():
        for i in range(L):
            for w, y in zip(layers[i % 2], outs):
                torch.mm(xs[w.shape[0]], w, out=y)
        torch.mm(xs[H], head, out=logits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # cuBLAS picks its kernels (and workspace) before capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del graph, layers, head, xs, outs, logits
    torch.cuda.empty_cache()
    return statistics.median(times[2:])


class Bench:
    def __init__(self, max_batch: int, model: str = "dummy-llama-7b",
                 utilization: float = 0.85):
        from slora.adapter_store import HostAdapterCache
        from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
        from slora.models.registry import dummy_model_config
        from slora.worker.args import default_num_pages
        from slora.worker.executor import Worker

        self.model = dummy_model_config(model)
        num_pages = default_num_pages(self.model, MAX_LORA_RANK, MAX_MODEL_LEN, "bfloat16",
                                      "cuda", utilization=utilization)
        config = EngineConfig(
            model=self.model,
            pool=PoolConfig(num_pages=num_pages, max_adapter_slots=max_batch,
                            max_lora_rank=MAX_LORA_RANK),
            scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=2048,
                                      max_model_len=MAX_MODEL_LEN),
            dtype="bfloat16", device="cuda")
        start = time.perf_counter()
        self.worker = Worker(config, None, "cuda", cuda_graphs=True)
        torch.cuda.synchronize()
        self.init_s = time.perf_counter() - start
        self.capture_s = self.worker.graphs.capture_time_s
        pages = self.worker.pool.pages
        for layer in pages:  # random K/V and adapter rows (never time on zeros)
            layer.normal_(0, 1.0)
        self.adapters = make_adapters(self.model, max_batch, pages.dtype)
        self.worker.host_cache = HostAdapterCache(
            1 << 40, lambda adapter_id, path: self.adapters[adapter_id])
        self.adapter_pages = self.model.adapter_num_pages({m: ADAPTER_RANK for m in TARGETS})
        self.kv_first_page = max_batch * self.adapter_pages
        self.num_pages = num_pages
        self.rng = torch.Generator().manual_seed(1)
        self.step_id = 0
        self.load_adapters(max_batch)

    def execute(self, cmd):
        cmd.step_id = self.step_id
        self.step_id += 1
        return self.worker.execute(cmd)

    def load_adapters(self, num: int) -> None:
        from slora.protos.step import AdapterLoad, StepCommand

        loads = [AdapterLoad(f"a{i}", f"bench://a{i}", i,
                             list(range(i * self.adapter_pages, (i + 1) * self.adapter_pages)))
                 for i in range(num)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, num, LOADS_PER_STEP):  # each load stages its rows on the device
            self.execute(StepCommand(0, adapter_loads=loads[i:i + LOADS_PER_STEP]))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        nbytes = sum(a.num_bytes for a in self.adapters.values())
        self.load_rate = nbytes / seconds
        print(f"loaded {num} adapters ({nbytes / 1e9:.2f} GB) in {seconds:.2f} s: "
              f"{self.load_rate / 1e9:.1f} GB/s host to pool", flush=True)

    def adopt(self, batch: int, with_adapters: bool, num_steps: int) -> dict[str, list[int]]:
        """`batch` requests at context CONTEXT_LEN; returns each one's pages for the steps."""
        from slora.common.sampling_params import SamplingParams
        from slora.protos.step import NO_ADAPTER_SLOT

        region = self.num_pages - self.kv_first_page
        perm = torch.randperm(region, generator=self.rng) + self.kv_first_page
        need = CONTEXT_LEN + num_steps
        step_pages = {}
        for i in range(batch):
            idx = torch.arange(i * need, (i + 1) * need) % region  # wraps when too few
            pages = perm[idx].tolist()
            tokens = torch.randint(3, self.model.vocab_size, (CONTEXT_LEN + 1,),
                                   generator=self.rng).tolist()
            req_id = f"r{self.step_id}-{i}"
            self.worker.adopt_request(req_id, tokens, CONTEXT_LEN, pages[:CONTEXT_LEN],
                                      i if with_adapters else NO_ADAPTER_SLOT,
                                      SamplingParams(max_new_tokens=1 << 20, ignore_eos=True))
            step_pages[req_id] = pages[CONTEXT_LEN:]
        return step_pages

    def run(self, batch: int, with_adapters: bool, graphs: bool, num_steps: int) -> dict:
        from slora.protos.step import RunningRequest, StepCommand
        from slora.worker.cuda_graphs import DECODE, NO_MODULES

        self.worker.use_cuda_graphs = graphs
        total = WARMUP_STEPS + num_steps
        step_pages = self.adopt(batch, with_adapters, total)
        times = []
        for s in range(total):
            cmd = StepCommand(0, running_requests=[
                RunningRequest(r, [pages[s]], CONTEXT_LEN + s, 1)
                for r, pages in step_pages.items()])
            start = time.perf_counter()
            result = self.execute(cmd)
            elapsed = time.perf_counter() - start
            assert len(result.token_ids) == batch
            if s >= WARMUP_STEPS:
                times.append(elapsed)
        replay = None
        if graphs:
            size = self.worker.graphs.bucket(batch)
            # The warm-up steps captured the adapters' LoRA set.
            modules = (self.worker.graphs.lora_set(frozenset(TARGETS)) if with_adapters
                       else NO_MODULES)
            reps = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self.worker.graphs.replay(DECODE, size, modules)
                b.record()
                b.synchronize()
                reps.append(a.elapsed_time(b) / 1e3)
            replay = statistics.median(reps)
        self.execute(StepCommand(0, finished_req_ids=list(step_pages)))
        return {"step_s": statistics.median(times), "replay_s": replay,
                "context": CONTEXT_LEN + WARMUP_STEPS + (num_steps + 1) / 2}


def table(rows: list[dict], meta: dict) -> str:
    out = [f"GPU: {meta['gpu']}; copy bandwidth {meta['copy_bw'] / 1e9:.0f} GB/s (read + write); "
           f"{meta.get('model', 'dummy-llama-7b')} bf16, context {CONTEXT_LEN}, "
           f"rank-{ADAPTER_RANK} adapters on "
           f"q,k,v,o (one per request), graphs captured in {meta['capture_s']:.1f} s",
           "",
           "| batch | adapters | graphs step (ms) | eager step (ms) | graph replay (ms) "
           "| roofline (ms) | graphs / roofline | eager / roofline | bytes (GB) "
           "| cuBLAS GEMMs alone (ms) | their weight GB/s | graphs / floor |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        roof = r["roofline_s"]
        gemms = r.get("gemms_s")
        floor = (f"| {gemms * 1e3:.2f} | {r['bytes']['weights'] / gemms / 1e9:.0f} "
                 f"| {r['graphs_s'] / r['floor_s']:.2f}x |" if gemms else "| – | – | – |")
        out.append(
            f"| {r['batch']} | {r['adapters']} | {r['graphs_s'] * 1e3:.2f} "
            f"| {r['eager_s'] * 1e3:.2f} | {r['replay_s'] * 1e3:.2f} | {roof * 1e3:.2f} "
            f"| {r['graphs_s'] / roof:.2f}x | {r['eager_s'] / roof:.2f}x "
            f"| {r['bytes']['total'] / 1e9:.1f} " + floor)
    out += ["", "floor: the step's dense GEMMs at the rate cuBLAS reaches alone at these shapes "
            "(one CUDA graph of just them), plus the other bytes (K/V, adapters) at the copy "
            "bandwidth."]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, adapters in zip(axes, (False, True)):
        sel = [r for r in rows if (r["adapters"] > 0) == adapters]
        xs = [r["batch"] for r in sel]
        for key, label, style in (("graphs_s", "CUDA graphs", "o-"), ("eager_s", "eager", "s--"),
                                  ("roofline_s", "roofline", "k:")):
            ax.plot(xs, [r[key] * 1e3 for r in sel], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("batch (requests at context 512)")
        ax.set_title("one rank-16 adapter per request" if adapters else "no adapters")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("decode step (ms)")
    axes[0].legend()
    fig.suptitle("Llama-2-7B bf16 decode step on " + rows[0].get("gpu", "GPU"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for decode_step.{md,json,png}")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--plot", type=Path, help="only redraw the PNG from this JSON")
    ap.add_argument("--model", default="dummy-llama-7b",
                    help="a dummy-<family>-<size> preset (slora.models.registry.DUMMY_MODELS)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                    help="share of free memory for weights + pool (the rest is left to graph "
                         "capture and activations)")
    args = ap.parse_args()
    if args.plot:
        data = json.loads(args.plot.read_text())
        plot(data["rows"], args.plot.with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        sys.exit("decode_step.py needs a CUDA GPU")
    from slora.kernels.cuda_compile import prebuild

    prebuild(torch.cuda.current_device(), dtypes=(torch.bfloat16,))
    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{gpu}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    bench = Bench(max(batches), args.model, args.gpu_memory_utilization)
    print(f"model {args.model}", flush=True)
    print(f"worker ready in {bench.init_s:.1f} s (graphs captured in {bench.capture_s:.1f} s), "
          f"{bench.num_pages} pages", flush=True)
    rows = []
    for batch in batches:
        gemms = dense_gemms_s(bench.model, batch)
        print(f"batch {batch:4d}: cuBLAS GEMMs alone {gemms * 1e3:7.2f} ms", flush=True)
        for with_adapters in (False, True):
            g = bench.run(batch, with_adapters, True, args.steps)
            e = bench.run(batch, with_adapters, False, args.steps)
            num_adapters = batch if with_adapters else 0
            nbytes = step_bytes(bench.model, batch, g["context"], num_adapters)
            row = {"batch": batch, "adapters": num_adapters, "graphs_s": g["step_s"],
                   "eager_s": e["step_s"], "replay_s": g["replay_s"],
                   "roofline_s": nbytes["total"] / bw, "bytes": nbytes,
                   "context": g["context"], "gpu": gpu, "gemms_s": gemms,
                   "floor_s": gemms + (nbytes["total"] - nbytes["weights"]) / bw}
            rows.append(row)
            print(f"batch {batch:4d} adapters {num_adapters:4d}: graphs "
                  f"{row['graphs_s'] * 1e3:7.2f} ms, eager {row['eager_s'] * 1e3:7.2f} ms, "
                  f"replay {row['replay_s'] * 1e3:7.2f} ms, roofline "
                  f"{row['roofline_s'] * 1e3:7.2f} ms", flush=True)
    meta = {"gpu": gpu, "model": args.model, "copy_bw": bw, "capture_s": bench.capture_s,
            "adapter_load_rate": bench.load_rate, "num_pages": bench.num_pages}
    text = table(rows, meta)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_step.md").write_text(text + "\n")
        (args.out / "decode_step.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                              indent=1))
        if plot(rows, args.out / "decode_step.png"):
            print(f"plot: {args.out / 'decode_step.png'}")
        else:
            print("matplotlib not installed: no plot (redraw with --plot)")
    print()
    print(text)


if __name__ == "__main__":
    main()
