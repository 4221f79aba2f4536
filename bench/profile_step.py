"""Where a worker step's GPU time goes, kernel by kernel (torch.profiler over real steps).

    python bench/profile_step.py [--model dummy-llama-7b] [--batch 64] [--prompt 256]
                                 [--steps 4] [--decode-only] [--out DIR]

A dummy model (default Llama-2-7B) in bf16 (bench/decode_step.py's setup): `--batch`
requests at context 512, with no adapter or one distinct rank-16 adapter each on q, k, v, o. Four settings: a decode
step, and a mixed step (batch - 1 decodes plus one new request's `--prompt`-token prefill),
each with and without adapters, each replaying the worker's CUDA graphs. For each one it
prints the host-clock step time (median of --steps) and the kernels the GPU ran in those
steps (CUPTI sees kernels inside graph replays): calls and microseconds per step by kernel,
the largest first, and their sum. With --out, writes profile_step.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step import CONTEXT_LEN, Bench  # noqa: E402


def kernel_table(prof, num_steps: int) -> list[dict]:
    per = collections.defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            row = per[evt.name]
            row[0] += 1
            row[1] += evt.device_time_total if hasattr(evt, "device_time_total") else \
                evt.cuda_time_total
    rows = [{"kernel": name, "calls": calls / num_steps, "us": us / num_steps}
            for name, (calls, us) in per.items()]
    return sorted(rows, key=lambda r: -r["us"])


class StepProfiler:
    def __init__(self, bench: Bench, batch: int, prompt: int):
        self.bench, self.batch, self.prompt = bench, batch, prompt
        self.gen = torch.Generator().manual_seed(7)
        self.new_count = 0

    def new_request(self, with_adapters: bool):
        from slora.common.sampling_params import SamplingParams
        from slora.protos.step import NO_ADAPTER_SLOT, NewRequest

        b = self.bench
        first = b.num_pages - (self.new_count % 8 + 1) * (self.prompt + 8)
        self.new_count += 1
        tokens = torch.randint(3, b.model.vocab_size, (self.prompt,), generator=self.gen)
        slot = (self.batch - 1) if with_adapters else NO_ADAPTER_SLOT
        return NewRequest(f"new{self.new_count}", tokens.tolist(), self.prompt,
                          list(range(first, first + self.prompt)), self.prompt, slot,
                          SamplingParams(max_new_tokens=4, ignore_eos=True))

    def run(self, with_adapters: bool, mixed: bool, num_steps: int) -> dict:
        from slora.protos.step import RunningRequest, StepCommand

        b = self.bench
        b.worker.use_cuda_graphs = True
        decodes = self.batch - 1 if mixed else self.batch
        total = 2 + 2 * num_steps
        step_pages = b.adopt(decodes, with_adapters, total)
        times, prev_new = [], None

        def step(s):
            nonlocal prev_new
            new = [self.new_request(with_adapters)] if mixed else []
            cmd = StepCommand(0, new_requests=new, running_requests=[
                RunningRequest(r, [pages[s]], CONTEXT_LEN + s, 1)
                for r, pages in step_pages.items()],
                finished_req_ids=[prev_new] if prev_new else [])
            prev_new = new[0].req_id if new else None
            torch.cuda.synchronize()
            start = time.perf_counter()
            b.execute(cmd)
            return time.perf_counter() - start

        for s in range(2):
            step(s)
        for s in range(2, 2 + num_steps):
            times.append(step(s))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for s in range(2 + num_steps, total):
                step(s)
            torch.cuda.synchronize()
        done = list(step_pages) + ([prev_new] if prev_new else [])
        b.execute(StepCommand(0, finished_req_ids=done))
        kernels = kernel_table(prof, num_steps)
        return {"adapters": with_adapters, "mixed": mixed, "step_s": statistics.median(times),
                "kernel_us": sum(k["us"] for k in kernels), "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--model", default="dummy-llama-7b",
                    help="a dummy-<family>-<size> preset (slora.models.registry.DUMMY_MODELS)")
    ap.add_argument("--decode-only", action="store_true", help="skip the mixed steps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a CUDA GPU")
    from slora.kernels.cuda_compile import prebuild

    prebuild(torch.cuda.current_device(), dtypes=(torch.bfloat16,))
    bench = Bench(args.batch, args.model)
    prof = StepProfiler(bench, args.batch, args.prompt)
    results = []
    for mixed in (False,) if args.decode_only else (False, True):
        for with_adapters in (False, True):
            r = prof.run(with_adapters, mixed, args.steps)
            results.append(r)
            label = (f"{'mixed' if mixed else 'decode'} batch {args.batch}"
                     + (f" + prompt {args.prompt}" if mixed else "")
                     + (", adapters" if with_adapters else ", no adapters"))
            print(f"\n## {label}: step {r['step_s'] * 1e3:.2f} ms, kernels "
                  f"{r['kernel_us'] / 1e3:.2f} ms per step", flush=True)
            print("| kernel | calls/step | us/step |\n|---|---:|---:|")
            for k in r["kernels"][:args.top]:
                print(f"| {k['kernel'][:90]} | {k['calls']:.0f} | {k['us']:.0f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
