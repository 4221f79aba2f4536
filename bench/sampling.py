"""What sampling adds to a step: `worker/sampling.py sample` over a batch's logits, by batch,
vocabulary and sampling parameters, on the GPU (or the CPU), against greedy decoding.

    python bench/sampling.py [--batches 1,64,256,512] [--vocabs 32000,152064] [--reps 10]
                             [--device cuda] [--out DIR]

Each row: `rows` requests with the same parameters over random float32 logits [rows, vocab]
(the worker's logits), timed on the host clock around `sample` (which ends with the tokens
on the host, as the worker needs them), median of --reps after two warm-ups; and the torch
operations one call issues (each a kernel launch on the GPU). Prints one table last; with
--out writes sampling.json there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from slora.common.sampling_params import SamplingParams
from slora.worker.sampling import sample

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.7": dict(temperature=0.7),
    "temperature 0.7, top_p 0.9": dict(temperature=0.7, top_p=0.9),
    "temperature 0.7, top_k 50, seeded": dict(temperature=0.7, top_k=50, seed=1),
}


def torch_ops(fn) -> int:
    """Top-level torch operations `fn` issues."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def time_sample(logits, params, generator, reps: int) -> float:
    index = list(range(len(params)))
    times = []
    for i in range(reps + 2):
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(logits, params, index, generator)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,64,256,512")
    ap.add_argument("--vocabs", default="32000,152064")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    rows = []
    for vocab in map(int, args.vocabs.split(",")):
        for batch in map(int, args.batches.split(",")):
            logits = torch.randn(batch, vocab, device=dev, generator=gen) * 3
            for setting, kw in SETTINGS.items():
                params = [SamplingParams(**kw)] * batch
                t = time_sample(logits, params, gen, args.reps)
                ops = torch_ops(lambda: sample(logits, params, list(range(batch)), gen))
                rows.append(dict(vocab=vocab, batch=batch, setting=setting, ms=t * 1e3,
                                 torch_ops=ops, device=name))
                print(f"vocab {vocab} batch {batch:4d} {setting}: {t * 1e3:8.2f} ms, "
                      f"{ops} torch ops", flush=True)
    lines = [f"sample() on {name}, float32 logits, median of {args.reps}", "",
             "| vocab | batch | setting | ms per call | torch ops |", "|---:|---:|---|---:|---:|"]
    lines += [f"| {r['vocab']} | {r['batch']} | {r['setting']} | {r['ms']:.2f} | "
              f"{r['torch_ops']} |" for r in rows]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sampling.json").write_text(json.dumps(rows, indent=1))
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
