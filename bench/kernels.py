"""Kernel benchmark: the GPU's own limits first, then each kernel against them.

    python bench/kernels.py [--out DIR] [--quick]
        [--sections decode,group,layer,prefill,prefill-layer,attention]

1. Copy bandwidth (a 1 GiB device-to-device copy, bytes read + written) and the dense bf16
   GEMM rate (8192^3 torch.matmul): the two ceilings every other figure is a percentage of.
2. Decode LoRA (MBGMV, Llama-2-7B q_proj 4096 -> 4096) at batch 1, 8, 64, 256, 512 with 1,
   32 and batch-many distinct adapters, ranks 16 and 64, pool max rank 64: shrink then
   expand as the worker launches them (`lora_decode(overlap_previous=True)`: the shrink
   behind the kernel before it, here the previous call's expand, and the expand behind the
   shrink, by programmatic dependent launch), the pair with its shrink launched plainly, both
   launched plainly, the fused kernel (one launch, `lora_shrink_expand`) and the one-pass
   kernel (`lora_decode_onepass`: shrink and expand in one launch, each block adding its
   rows' part into y), also with twice its parts. A row's time is the path the worker takes
   for one module (decode_lora_path): on Hopper the one-pass kernel below ONEPASS_MAX_TOKENS
   tokens; otherwise the pair below FUSED_DECODE_MIN_TOKENS and the fused kernel from there.
   Bytes count each adapter row and each activation once (A and B^T rows of the distinct
   adapters, x read, y read and written, v written and read; the fused and one-pass kernels
   keep v on chip). Then a group, q, k and v together (what the worker runs for them): the
   one-pass kernel for the group, the group's shrink and expand (one launch each) and the
   fused kernel, the row's time by decode_lora_path as for one module, against each other and
   three modules' two launches. Then the LoRA of one module behind its base projection's
   GEMM, as the worker runs it: what it adds to the GEMM and the layer's next kernel (a
   stand-in, NextKernel), overlapping the GEMM's end and launched plainly. Timed as CUDA-graph
   replays cycling over several page tables on disjoint pages (more bytes than L2 holds, so
   rows come from HBM), median over replays. Speedup is over the torch reference (torch_ref,
   eager).
3. Prefill LoRA (MBGMM shrink + expand on tensor cores, as the worker launches them:
   `lora_shrink_expand_segments`, v zeroed, the shrink, the expand behind it by programmatic
   dependent launch), 4096 tokens in 8 segments of distinct adapters, ranks 16, 64, 128:
   TFLOP/s (2 * tokens * rank * (d_in + d_out)) against the GEMM rate, and against the
   roofline min(GEMM rate, bytes / copy bandwidth): at these ranks the work is bound by
   moving x and y, not by arithmetic. Beside it, the library floor of a LoRA kept apart from
   the base GEMM, measured in the same run: cuBLAS's x @ A^T for one dense adapter (x read
   once) plus y read and written (two thirds of torch's in-place y += x), and the time 30% of
   the GEMM rate would take. Then the same behind the base projection's GEMM, as
   the decode rows above: what the LoRA adds to the GEMM and the next kernel; beside it the
   LoRA inside the GEMM by a wider K (wide_k_rows) and that wider GEMM alone.
4. Decode attention at batch 64 x context 1024 and 4096 (Llama-2-7B: 32 heads; Llama-3-8B:
   32 query / 8 KV heads), every position on its own random page: GB/s of K and V read.

Prints one table last; with --out, writes it as markdown and JSON there, and a PNG if
matplotlib is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from slora.kernels import launchers as L
from slora.kernels import torch_ref
from slora.kernels.backend import LoraBatch, LoraGroup, LoraTables
from slora.kernels.cuda_backend import CudaBackend
from slora.kernels.cuda_compile import prebuild

DEV = "cuda"
DTYPE = torch.bfloat16
H = 4096
L2_FLUSH_BYTES = 256 << 20  # replay over at least this many distinct bytes


def events_time(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `reps` runs, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def graph_time(fns: list, reps: int = 20, per_graph: int | None = None) -> float:
    """Median seconds per call of the launches in `fns`, captured in a CUDA graph in turn
    (several variants so the data rotates), replayed `reps` times."""
    per_graph = per_graph or max(len(fns), 8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    return events_time(graph.replay, reps, warmup=1) / per_graph


def measure_limits(quick: bool) -> tuple[float, float]:
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t = events_time(lambda: dst.copy_(src), 10 if quick else 30)
    copy_bw = 2 * n / t
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=DEV, dtype=DTYPE)
    b = torch.randn(m, m, device=DEV, dtype=DTYPE)
    t = events_time(lambda: a @ b, 5 if quick else 15)
    gemm = 2 * m ** 3 / t
    return copy_bw, gemm


def fill_pool(num_pages: int, width: int) -> torch.Tensor:
    pool = torch.empty(num_pages, 2, width, device=DEV, dtype=DTYPE)
    for chunk in pool.split(8192):
        chunk.normal_(0, 0.02)
    return pool


@contextlib.contextmanager
def plain_launches():
    """lora_decode without programmatic dependent launch."""
    saved, L.routing.PDL = L.routing.PDL, False
    try:
        yield
    finally:
        L.routing.PDL = saved


def bench_decode_lora(pool, copy_bw, quick):
    rows = []
    num_pages = pool.shape[0]
    d_in = d_out = H
    max_rank = 64
    batches = (1, 8, 64, 256, 512)
    for rank in (16, 64):
        for batch in batches:
            for num_adapters in sorted({1, min(32, batch), batch}):
                rows_per_set = num_adapters * rank
                adapter_bytes = rows_per_set * (d_in + d_out) * 2
                act_bytes = batch * (d_in * 2 + d_out * 4) + batch * max_rank * 4 * 2
                num_sets = max(1, min(16, math.ceil(L2_FLUSH_BYTES / adapter_bytes),
                                      num_pages // rows_per_set))
                perm = torch.randperm(num_pages, device=DEV).to(torch.int32)
                tables = []
                for s in range(num_sets):
                    t = torch.zeros(num_adapters, max_rank, 1, dtype=torch.int32, device=DEV)
                    t[:, :rank, 0] = perm[s * rows_per_set:(s + 1) * rows_per_set].view(
                        num_adapters, rank)
                    tables.append(t)
                ranks = torch.full((num_adapters,), rank, dtype=torch.int32, device=DEV)
                scales = torch.full((num_adapters,), 0.5, device=DEV)
                slots = (torch.arange(batch, device=DEV) % num_adapters).to(torch.int32)
                slots = slots[torch.randperm(batch, device=DEV)].contiguous()
                x = torch.randn(batch, d_in, device=DEV, dtype=DTYPE)
                y = torch.randn(batch, d_out, device=DEV, dtype=DTYPE)
                v = torch.empty(batch, max_rank, device=DEV)
                group = torch.tensor([[0, 0, d_out]], dtype=torch.int32, device=DEV)

                def two(t, overlap=True):  # the worker's launches: behind the kernel before
                    return lambda: L.lora_decode(y, x, pool, t, ranks, scales, slots, v_out=v,
                                                 overlap_previous=overlap)

                def fused(t):  # one module: the tables of a group of one
                    t4, r2, s2 = t.unsqueeze(0), ranks.unsqueeze(0), scales.unsqueeze(0)
                    return lambda: L.lora_shrink_expand(y, x, pool, t4, r2, s2, slots, group,
                                                        max_d_out=d_out, overlap_previous=True)
                t_pair = graph_time([two(t) for t in tables], reps=10 if quick else 30)
                t_pair_plain_shrink = graph_time([two(t, overlap=False) for t in tables],
                                                 reps=10 if quick else 30)
                t_fused = graph_time([fused(t) for t in tables], reps=10 if quick else 30)

                def onepass(t, parts=None):  # one launch, blocks adding into y
                    return lambda: L.lora_decode_onepass(y, x, pool, t, ranks, scales, slots,
                                                         parts=parts, overlap_previous=True)
                t_onepass = graph_time([onepass(t) for t in tables], reps=10 if quick else 30)
                # Twice the parts (where the rank has the row groups): what the cap on y's
                # roundings (ONEPASS_MAX_PARTS) costs.
                parts = L.onepass_parts(batch, max_rank, pool.device.index)
                t_onepass_2x = graph_time([onepass(t, 2 * parts) for t in tables],
                                          reps=10 if quick else 30)
                with plain_launches():
                    t_plain = graph_time([two(t) for t in tables], reps=10 if quick else 30)

                def ref():
                    vr = torch_ref.lora_shrink(x, pool, tables[0], ranks, slots)
                    torch_ref.lora_expand(y, vr, pool, tables[0], ranks, scales, slots)
                t_ref = events_time(ref, 2 if quick or num_adapters > 64 else 5, warmup=1)
                pair_bytes = adapter_bytes + act_bytes
                fused_bytes = adapter_bytes + batch * (d_in * 2 + d_out * 4)  # v stays on chip
                # The path the worker takes for one module at this batch (cuda_backend).
                path = L.decode_lora_path(batch, 1, pool.device.index)
                t_ours, nbytes = {"fused": (t_fused, fused_bytes),
                                  "one pass": (t_onepass, fused_bytes),
                                  "pair": (t_pair, pair_bytes)}[path]
                rows.append(dict(
                    section="decode LoRA", rank=rank, batch=batch, adapters=num_adapters,
                    config=f"r{rank} batch {batch} adapters {num_adapters}",
                    path=path,
                    time_us=t_ours * 1e6, rate=nbytes / t_ours / 1e9, unit="GB/s",
                    pct=100 * nbytes / t_ours / copy_bw, speedup=t_ref / t_ours,
                    ref_us=t_ref * 1e6, pair_us=t_pair * 1e6, plain_us=t_plain * 1e6,
                    pair_plain_shrink_us=t_pair_plain_shrink * 1e6, fused_us=t_fused * 1e6,
                    onepass_us=t_onepass * 1e6, onepass_parts=parts,
                    onepass_2x_us=t_onepass_2x * 1e6,
                    pair_pct=100 * pair_bytes / t_pair / copy_bw,
                    fused_pct=100 * fused_bytes / t_fused / copy_bw))
                r = rows[-1]
                print(f"decode LoRA {r['config']}: {t_ours * 1e6:.1f} us, {r['rate']:.0f} GB/s "
                      f"({r['pct']:.0f}%), {r['speedup']:.1f}x torch ref; pair "
                      f"{t_pair * 1e6:.1f} us ({r['pair_pct']:.0f}%; shrink launched plainly "
                      f"{t_pair_plain_shrink * 1e6:.1f}; plain launches {t_plain * 1e6:.1f}), "
                      f"fused {t_fused * 1e6:.1f} us ({r['fused_pct']:.0f}%), one pass "
                      f"{t_onepass * 1e6:.1f} us ({parts} parts; {2 * parts}: "
                      f"{t_onepass_2x * 1e6:.1f})", flush=True)
    return rows


def bench_decode_lora_group(pool, copy_bw, quick):
    """q, k and v of Llama-2-7B (three 4096 -> 4096 modules), rank 16, one adapter per
    token, the path the worker takes (decode_lora_path): on Hopper the one-pass kernel
    (lora_decode_onepass_group) below ONEPASS_MAX_TOKENS; otherwise below
    FUSED_GROUP_MIN_TOKENS the group's shrink and its expand, one launch each
    (lora_decode_group); the fused kernel (one launch) from there; beside them the others
    and shrink + expand per module (six launches)."""
    rows = []
    rank, max_rank, num_modules = 16, 64, 3
    for batch in (1, 8, 16, 32, 64, 256, 512):
        rows_per_set = batch * rank * num_modules
        perm = torch.randperm(pool.shape[0], device=DEV).to(torch.int32)
        num_sets = max(1, min(8, pool.shape[0] // rows_per_set))
        tables = []
        for s in range(num_sets):
            t = torch.zeros(num_modules, batch, max_rank, 1, dtype=torch.int32, device=DEV)
            t[:, :, :rank, 0] = perm[s * rows_per_set:(s + 1) * rows_per_set].view(
                num_modules, batch, rank)
            tables.append(t)
        ranks = torch.full((num_modules, batch), rank, dtype=torch.int32, device=DEV)
        scales = torch.full((num_modules, batch), 0.5, device=DEV)
        slots = torch.randperm(batch, device=DEV).to(torch.int32)
        group = torch.tensor([[m, m * H, H] for m in range(num_modules)], dtype=torch.int32,
                             device=DEV)
        x = torch.randn(batch, H, device=DEV, dtype=DTYPE)
        y = torch.randn(batch, num_modules * H, device=DEV, dtype=DTYPE)
        v = torch.empty(batch, max_rank, device=DEV)

        def fused(t):
            return lambda: L.lora_shrink_expand(y, x, pool, t, ranks, scales, slots, group,
                                                max_d_out=H, overlap_previous=True)

        def pair(t):
            return lambda: L.lora_decode_group(y, x, pool, t, ranks, scales, slots, group,
                                               max_d_out=H, overlap_previous=True)

        def onepass(t):
            return lambda: L.lora_decode_onepass_group(y, x, pool, t, ranks, scales, slots,
                                                       group, max_d_out=H,
                                                       overlap_previous=True)

        def per_module(t):
            def f():
                for m in range(num_modules):
                    L.lora_decode(y[:, m * H:(m + 1) * H], x, pool, t[m], ranks[m], scales[m],
                                  slots, v_out=v, overlap_previous=True)
            return f
        reps = 10 if quick else 30
        t_fused = graph_time([fused(t) for t in tables], reps=reps)
        t_pair = graph_time([pair(t) for t in tables], reps=reps)
        t_onepass = graph_time([onepass(t) for t in tables], reps=reps)
        t_per = graph_time([per_module(t) for t in tables], reps=reps)
        path = L.decode_lora_path(batch, num_modules, pool.device.index)
        t_ours = {"fused": t_fused, "group pair": t_pair, "one pass": t_onepass}[path]
        t_ref = events_time(lambda: torch_ref.lora_shrink_expand(
            y, x, pool, tables[0], ranks, scales, slots, group), 2, warmup=1)
        nbytes = rows_per_set * 2 * H * 2 + batch * (H * 2 + num_modules * H * 4)
        rows.append(dict(
            section="decode LoRA group", rank=rank, batch=batch, adapters=batch,
            config=f"q,k,v r{rank} batch {batch} adapters {batch}", time_us=t_ours * 1e6,
            rate=nbytes / t_ours / 1e9, unit="GB/s", pct=100 * nbytes / t_ours / copy_bw,
            speedup=t_ref / t_ours, ref_us=t_ref * 1e6, per_module_us=t_per * 1e6,
            fused_us=t_fused * 1e6, group_pair_us=t_pair * 1e6, onepass_us=t_onepass * 1e6,
            path=path))
        print(f"decode LoRA group {rows[-1]['config']}: group pair {t_pair * 1e6:.1f} us, "
              f"fused {t_fused * 1e6:.1f} us, one pass {t_onepass * 1e6:.1f} us, "
              f"per module {t_per * 1e6:.1f} us, "
              f"{rows[-1]['pct']:.0f}% copy BW", flush=True)
    return rows


class NextKernel:
    """The kernel after a projection in the worker's layer (rope, a norm, silu_mul; never
    another GEMM), as a one-element add. The behind-GEMM rows put it after the GEMM with and
    without the LoRA: cuBLAS GEMMs launched back to back overlap one another's ends, which a
    GEMM in the worker's layer never does, so a baseline of bare GEMMs would charge that
    overlap to the LoRA."""

    def __init__(self):
        self.t = torch.zeros(1, device=DEV)

    def __call__(self):
        self.t.add_(1)


def bench_decode_lora_behind_gemm(pool, copy_bw, quick):
    """The decode LoRA of one module where the worker runs it: right behind the base
    projection's GEMM (y = x @ W^T, Llama-2-7B q_proj, the weights rotating over 8 copies so
    they come from HBM), one adapter per token, the layer's next kernel after it (NextKernel).
    A row's time is what the LoRA adds to the GEMM and that kernel: the worker's launches
    (overlapping the GEMM's end) and, beside it, the same kernels launched plainly."""
    rows = []
    next_kernel = NextKernel()
    backend = CudaBackend()
    max_rank, d_in, d_out = 64, H, H
    weights = [torch.randn(d_out, d_in, device=DEV, dtype=DTYPE) * d_in ** -0.5
               for _ in range(8)]
    for rank in (16, 64):
        for batch in (1, 8, 64, 256):
            rows_per_set = batch * rank
            perm = torch.randperm(pool.shape[0], device=DEV).to(torch.int32)
            tables = []
            for i in range(len(weights)):
                t = torch.zeros(batch, max_rank, 1, dtype=torch.int32, device=DEV)
                lo = (i * rows_per_set) % (pool.shape[0] - rows_per_set)
                t[:, :rank, 0] = perm[lo:lo + rows_per_set].view(batch, rank)
                tables.append(t)
            ranks = torch.full((batch,), rank, dtype=torch.int32, device=DEV)
            scales = torch.full((batch,), 0.5, device=DEV)
            slots = torch.randperm(batch, device=DEV).to(torch.int32)
            x = torch.randn(batch, d_in, device=DEV, dtype=DTYPE)
            y = torch.empty(batch, d_out, device=DEV, dtype=DTYPE)
            group = LoraGroup(members=((0, 0, d_out),),
                              table=torch.tensor([[0, 0, d_out]], dtype=torch.int32, device=DEV))
            lora_batch = LoraBatch(token_slots=slots, num_decode_tokens=batch,
                                   seg_starts=torch.zeros(1, dtype=torch.int32, device=DEV),
                                   seg_slots=torch.zeros(0, dtype=torch.int32, device=DEV),
                                   any_lora=True)
            # The path CudaBackend.lora_group takes.
            path = L.decode_lora_path(batch, 1, pool.device.index)

            def layer(w, t, lora=True, overlap=True):
                tables = LoraTables(t.unsqueeze(0), ranks.unsqueeze(0), scales.unsqueeze(0))

                def f():  # Model.linear: the GEMM, then the LoRA of its group
                    torch.matmul(x, w.T, out=y)
                    if lora:
                        backend.lora_group(y, x, pool, tables, group, lora_batch,
                                           after_base_gemm=overlap)
                    next_kernel()
                return f
            reps = 10 if quick else 30
            pairs = list(zip(weights, tables))
            t_gemm = graph_time([layer(w, t, lora=False) for w, t in pairs], reps=reps)
            t_with = graph_time([layer(w, t) for w, t in pairs], reps=reps)
            t_plain = graph_time([layer(w, t, overlap=False) for w, t in pairs], reps=reps)
            added, added_plain = t_with - t_gemm, t_plain - t_gemm
            nbytes = rows_per_set * (d_in + d_out) * 2 + batch * (d_in * 2 + d_out * 4)
            rows.append(dict(
                section="decode LoRA behind GEMM", rank=rank, batch=batch, adapters=batch,
                config=f"r{rank} batch {batch} adapters {batch}",
                path=path, time_us=added * 1e6,
                rate=nbytes / added / 1e9, unit="GB/s", pct=100 * nbytes / added / copy_bw,
                gemm_us=t_gemm * 1e6, with_us=t_with * 1e6, added_plain_us=added_plain * 1e6))
            r = rows[-1]
            print(f"decode LoRA behind GEMM {r['config']}: GEMM {t_gemm * 1e6:.1f} us, with "
                  f"LoRA {t_with * 1e6:.1f} (+{added * 1e6:.1f}; launched plainly "
                  f"+{added_plain * 1e6:.1f})", flush=True)
    return rows


PREFILL_TOKENS, PREFILL_SEGS, PREFILL_MAX_RANK = 4096, 8, 128
PREFILL_IN_GEMM_TARGET = {16: 0.08, 64: 0.15}
"""What the prefill LoRA may add to its base GEMM and the next kernel, by rank (issue 28)."""
"""The prefill rows' batch: 4096 tokens in 8 equal segments of distinct adapters (slots 0..7)."""


def prefill_segments() -> tuple[torch.Tensor, torch.Tensor]:
    """seg_starts, seg_slots of the prefill rows' batch."""
    seg_len = PREFILL_TOKENS // PREFILL_SEGS
    return (torch.arange(0, PREFILL_TOKENS + 1, seg_len, dtype=torch.int32, device=DEV),
            torch.arange(PREFILL_SEGS, dtype=torch.int32, device=DEV))


def prefill_tables(pool, rank: int):
    """One module's page table [segs, max rank, 1] (rows on random pages), ranks and scales
    [segs] for the prefill rows' adapters, all of rank `rank`."""
    perm = torch.randperm(pool.shape[0], device=DEV).to(torch.int32)
    table = torch.zeros(PREFILL_SEGS, PREFILL_MAX_RANK, 1, dtype=torch.int32, device=DEV)
    table[:, :rank, 0] = perm[:PREFILL_SEGS * rank].view(PREFILL_SEGS, rank)
    ranks = torch.full((PREFILL_SEGS,), rank, dtype=torch.int32, device=DEV)
    scales = torch.full((PREFILL_SEGS,), 0.5, device=DEV)
    return table, ranks, scales


def bench_prefill_lora(pool, copy_bw, gemm, quick):
    rows = []
    tokens, num_segs, max_rank = PREFILL_TOKENS, PREFILL_SEGS, PREFILL_MAX_RANK
    d_in = d_out = H
    seg_len = tokens // num_segs
    seg_starts, seg_slots = prefill_segments()
    reps = 10 if quick else 30
    sets = [(torch.randn(tokens, d_in, device=DEV, dtype=DTYPE),
             torch.randn(tokens, d_out, device=DEV, dtype=DTYPE)) for _ in range(3)]
    v = torch.empty(tokens, max_rank, device=DEV)
    group = torch.tensor([[0, 0, d_out]], dtype=torch.int32, device=DEV)
    # The library floor of any LoRA kept apart from the base GEMM: y read and written (two
    # thirds of torch's y += x, which moves three such matrices) ...
    t_add = graph_time([lambda x=x, y=y: y.add_(x) for x, y in sets], reps=reps)
    t_y = t_add * 2 / 3
    for rank in (16, 64, 128):
        table, ranks, scales = prefill_tables(pool, rank)

        def ours(x, y):  # the worker's launches (CudaBackend.lora_group): one module's group
            t4, r2, s2 = table.unsqueeze(0), ranks.unsqueeze(0), scales.unsqueeze(0)
            return lambda: L.lora_shrink_expand_segments(y, x, pool, t4, r2, s2, seg_starts,
                                                         seg_slots, group, max_d_out=d_out)
        t_ours = graph_time([ours(x, y) for x, y in sets], reps=reps)

        def shrink(x):
            def f():
                v.zero_()
                L.lora_shrink_segments(x, pool, table, ranks, seg_starts, seg_slots, out=v)
            return f
        t_shrink = graph_time([shrink(x) for x, _ in sets], reps=reps)
        # ... and x read through cuBLAS's x @ A^T of one adapter of this rank (dense A).
        a_dense = torch.randn(rank, d_in, device=DEV, dtype=DTYPE)
        v_lib = torch.empty(tokens, rank, device=DEV, dtype=DTYPE)
        t_lib = graph_time([lambda x=x: torch.mm(x, a_dense.T, out=v_lib) for x, _ in sets],
                           reps=reps)
        floor = t_lib + t_y
        x, y = sets[0]
        slots = torch.repeat_interleave(seg_slots, seg_len)

        def ref():
            vr = torch_ref.lora_shrink(x, pool, table, ranks, slots)
            torch_ref.lora_expand(y, vr, pool, table, ranks, scales, slots)
        t_ref = events_time(ref, 3, warmup=1)
        flops = 2 * tokens * rank * (d_in + d_out)
        xy_bytes = tokens * (d_in * 2 + d_out * 4)  # x read, y read and written
        nbytes = xy_bytes + num_segs * rank * (d_in + d_out) * 2
        roof = min(gemm, flops / (nbytes / copy_bw))
        rate = flops / t_ours
        rows.append(dict(
            section="prefill LoRA", rank=rank, config=f"r{rank} 4096 tokens 8 adapters",
            time_us=t_ours * 1e6, rate=rate / 1e12, unit="TFLOP/s", pct=100 * rate / gemm,
            pct_roofline=100 * rate / roof, roofline_tflops=roof / 1e12,
            speedup=t_ref / t_ours, ref_us=t_ref * 1e6, shrink_us=t_shrink * 1e6,
            target_us=flops / (0.3 * gemm) * 1e6, lib_shrink_us=t_lib * 1e6,
            y_rw_us=t_y * 1e6, floor_us=floor * 1e6,
            dram_us=xy_bytes / copy_bw * 1e6))
        print(f"prefill LoRA r{rank}: {t_ours * 1e6:.1f} us (shrink alone "
              f"{t_shrink * 1e6:.1f}), {rate / 1e12:.1f} TFLOP/s "
              f"({rows[-1]['pct']:.1f}% of GEMM, {rows[-1]['pct_roofline']:.0f}% of roofline "
              f"{roof / 1e12:.0f}), {rows[-1]['speedup']:.1f}x torch ref; {judge(rows[-1])}",
              flush=True)
    return rows


def bench_prefill_lora_behind_gemm(pool, gemm, quick):
    """The prefill LoRA of one module where the worker runs it: behind the base projection's
    GEMM (4096 tokens, Llama-2-7B q_proj, 3 rotating sets of x, y and W), 8 segments of
    distinct adapters, the layer's next kernel after it (NextKernel). A row's time is what
    CudaBackend.lora_group adds to the GEMM and that kernel."""
    rows = []
    backend, next_kernel = CudaBackend(), NextKernel()
    tokens, d_in, d_out = PREFILL_TOKENS, H, H
    seg_starts, seg_slots = prefill_segments()
    lora_batch = LoraBatch(
        token_slots=seg_slots.repeat_interleave(tokens // PREFILL_SEGS), num_decode_tokens=0,
        seg_starts=seg_starts, seg_slots=seg_slots, any_lora=True)
    group = LoraGroup(members=((0, 0, d_out),),
                      table=torch.tensor([[0, 0, d_out]], dtype=torch.int32, device=DEV))
    sets = [(torch.randn(tokens, d_in, device=DEV, dtype=DTYPE),
             torch.empty(tokens, d_out, device=DEV, dtype=DTYPE),
             torch.randn(d_out, d_in, device=DEV, dtype=DTYPE) * d_in ** -0.5)
            for _ in range(3)]
    for rank in (16, 64, 128):
        tables = LoraTables(*(t.unsqueeze(0) for t in prefill_tables(pool, rank)))

        def layer(x, y, w, lora=True):
            def f():  # Model.linear: the GEMM, then the LoRA of its group
                torch.matmul(x, w.T, out=y)
                if lora:
                    backend.lora_group(y, x, pool, tables, group, lora_batch,
                                       after_base_gemm=True)
                next_kernel()
            return f
        reps = 10 if quick else 30
        t_gemm = graph_time([layer(*s, lora=False) for s in sets], reps=reps)
        t_with = graph_time([layer(*s) for s in sets], reps=reps)
        added = t_with - t_gemm
        flops = 2 * tokens * rank * (d_in + d_out)
        rows.append(dict(
            section="prefill LoRA behind GEMM", rank=rank,
            config=f"r{rank} 4096 tokens 8 adapters", path="MBGMM pair", time_us=added * 1e6,
            rate=flops / added / 1e12, unit="TFLOP/s", pct=100 * flops / added / gemm,
            gemm_us=t_gemm * 1e6, with_us=t_with * 1e6))
        print(f"prefill LoRA behind GEMM r{rank}: GEMM {t_gemm * 1e6:.1f} us, with LoRA "
              f"{t_with * 1e6:.1f} (+{added * 1e6:.1f})", flush=True)
        rows += wide_k_rows(pool, sets, tables, rank, t_gemm, next_kernel, gemm, reps,
                            layer(*sets[0]))
    return rows


def wide_k_rows(pool, sets, tables, rank, t_gemm, next_kernel, gemm, reps, mbgmm_step):
    """The LoRA inside the base GEMM by a wider K: y = [x | M] [W | B']^T, where M holds each
    token's scale * x A_s^T in its segment's block of S * rank columns (zeros in the others)
    and B' the step's B_s side by side, one cuBLAS GEMM doing x W^T + the expand. The
    producer of x would write it into the wide buffer (here x sits there already); what the
    step adds is gathering B' from the pool pages into the weight's spare columns, the MBGMM
    shrink, masking its result into M, and the extra K of the GEMM. Two rows: that path, and
    the wider GEMM alone (the FLOPs floor of this way: (S * rank) / d_in more work)."""
    tokens, segs = PREFILL_TOKENS, PREFILL_SEGS
    table, ranks, scales = tables.page_table[0], tables.ranks[0], tables.scales[0]
    seg_starts, seg_slots = prefill_segments()
    seg_of_token = torch.arange(segs, device=DEV).repeat_interleave(tokens // segs)
    scale_mask = (torch.nn.functional.one_hot(seg_of_token, segs).float()
                  * scales[seg_slots][seg_of_token, None])  # [tokens, segs]
    b_pages = table[seg_slots, :rank, 0].flatten().long()  # [segs * rank]
    v = torch.zeros(tokens, PREFILL_MAX_RANK, device=DEV)
    wide = []
    for x, y, w in sets:
        d_out, d_in = w.shape
        x_wide = torch.zeros(tokens, d_in + segs * rank, device=DEV, dtype=DTYPE)
        x_wide[:, :d_in] = x
        w_wide = torch.zeros(d_out, d_in + segs * rank, device=DEV, dtype=DTYPE)
        w_wide[:, :d_in] = w
        wide.append((x_wide, y, w_wide, d_in))

    def step(x_wide, y, w_wide, d_in, lora=True):
        def f():
            if lora:
                w_wide[:, d_in:].copy_(pool[b_pages, 1, :y.shape[1]].T)  # B' from the pages
                v.zero_()
                L.lora_shrink_segments(x_wide[:, :d_in], pool, table, ranks, seg_starts,
                                       seg_slots, out=v)
                torch.mul(v[:, None, :rank], scale_mask[:, :, None],
                          out=x_wide[:, d_in:].view(tokens, segs, rank))
            torch.matmul(x_wide, w_wide.T, out=y)
            next_kernel()
        return f
    # Same sums as the MBGMM pair, to bf16 rounding of x A^T.
    x_wide, y, w_wide, d_in = wide[0]
    mbgmm_step()
    expected = y.float().clone()
    base = (x_wide[:, :d_in].float() @ w_wide[:, :d_in].float().T)
    step(*wide[0])()
    torch.cuda.synchronize()
    err = ((y.float() - expected).norm() / (expected - base).norm()).item()
    if not err < 2e-2:
        raise AssertionError(f"wide-K r{rank}: LoRA term off by {err:.3g} (relative)")
    t_path = graph_time([step(*s) for s in wide], reps=reps)
    t_wide_gemm = graph_time([step(*s, lora=False) for s in wide], reps=reps)
    flops = 2 * tokens * rank * (2 * H)
    out = []
    for path, t in (("wide-K GEMM", t_path - t_gemm), ("wide-K GEMM alone", t_wide_gemm - t_gemm)):
        out.append(dict(section="prefill LoRA behind GEMM", rank=rank,
                        config=f"r{rank} 4096 tokens 8 adapters", path=path, time_us=t * 1e6,
                        rate=flops / t / 1e12, unit="TFLOP/s", pct=100 * flops / t / gemm,
                        gemm_us=t_gemm * 1e6, with_us=(t + t_gemm) * 1e6, lora_err=err))
    print(f"prefill LoRA in a wide-K GEMM r{rank}: +{(t_path - t_gemm) * 1e6:.1f} us "
          f"({100 * (t_path - t_gemm) / t_gemm:.1f}% of the GEMM; the wider GEMM alone "
          f"+{(t_wide_gemm - t_gemm) * 1e6:.1f} us), LoRA term within {err:.1e}", flush=True)
    return out


def bench_decode_attention(copy_bw, quick):
    rows = []
    batch = 64
    # (name, heads, KV heads, sliding window, contexts): Mistral-7B reads its last 4096 only.
    for name, num_heads, num_kv_heads, window, contexts in (
            ("llama2-7b", 32, 32, 0, (1024, 4096)), ("llama3-8b-gqa", 32, 8, 0, (1024, 4096)),
            ("mistral-7b-w4096", 32, 8, 4096, (8192,))):
        head_dim = H // num_heads
        kv_dim = num_kv_heads * head_dim
        for ctx in contexts:
            num_pages = batch * ctx + 64
            pool = fill_pool(num_pages, H)
            perm = torch.randperm(num_pages, device=DEV).to(torch.int32)
            table = perm[:batch * ctx].view(batch, ctx).contiguous()
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            q = torch.randn(batch, num_heads, head_dim, device=DEV, dtype=DTYPE)
            out = torch.empty_like(q)
            scale = head_dim ** -0.5
            t_ours = graph_time([lambda: L.paged_attention_decode(
                q, pool, table, lens, num_kv_heads, scale, sliding_window=window, out=out)],
                reps=10 if quick else 30, per_graph=4)
            t_ref = events_time(lambda: torch_ref.paged_attention_decode(
                q, pool, table, lens, num_kv_heads, scale, sliding_window=window), 2, warmup=1)
            read = min(ctx, window) if window else ctx  # positions each query reads
            nbytes = batch * read * kv_dim * 2 * 2 + 2 * q.numel() * 2
            rows.append(dict(
                section="decode attention", config=f"{name} batch 64 ctx {ctx}",
                time_us=t_ours * 1e6, rate=nbytes / t_ours / 1e9, unit="GB/s",
                pct=100 * nbytes / t_ours / copy_bw, speedup=t_ref / t_ours,
                ref_us=t_ref * 1e6, ctx=ctx))
            print(f"decode attention {rows[-1]['config']}: {t_ours * 1e6:.1f} us, "
                  f"{rows[-1]['rate']:.0f} GB/s ({rows[-1]['pct']:.0f}%)", flush=True)
            del pool
            torch.cuda.empty_cache()
    return rows


def judge(row) -> str:
    """The issue's target for this row, and whether it was met."""
    if row["section"] == "decode LoRA" and row["batch"] >= 64 and row["adapters"] == row["batch"]:
        ok = row["pct"] >= 60 and row["speedup"] >= 3
        return ("met" if ok else "MISSED") + " (>=60% BW, >=3x)"
    if row["section"] == "decode attention":
        return ("met" if row["pct"] >= 60 else "MISSED") + " (>=60% BW)"
    if row["section"] == "prefill LoRA":
        # With what 30% takes, against the library floor of a LoRA apart from the base GEMM.
        return (("met" if row["pct"] >= 30 else "MISSED")
                + f" (>=30% GEMM: {row['target_us']:.1f} us; library floor "
                f"{row['floor_us']:.1f} = x @ A^T {row['lib_shrink_us']:.1f} + y r/w "
                f"{row['y_rw_us']:.1f}; x read once and y read and written at the copy "
                f"bandwidth {row['dram_us']:.1f})")
    if (row["section"] == "prefill LoRA behind GEMM" and row["rank"] in PREFILL_IN_GEMM_TARGET
            and row["path"] != "wide-K GEMM alone"):
        target = PREFILL_IN_GEMM_TARGET[row["rank"]]
        added = row["time_us"] / (row["with_us"] - row["time_us"])
        return (("met" if added <= target else "MISSED")
                + f" (adds {100 * added:.1f}% to the GEMM; <= {100 * target:.0f}%)")
    return ""


def table(rows, copy_bw, gemm, gpu) -> str:
    lines = [f"GPU: {gpu}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write), "
             f"bf16 GEMM {gemm / 1e12:.0f} TFLOP/s (8192^3)", "",
             "| kernel | config | time (us) | achieved | % of limit | vs torch ref | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        limit = "copy BW" if r["unit"] == "GB/s" else "GEMM"
        speedup = f"{r['speedup']:.1f}x" if "speedup" in r else "–"
        extra = f" ({r['pct_roofline']:.0f}% of roofline)" if "pct_roofline" in r else ""
        if "pair_us" in r:
            extra = (f" ({r['path']}; pair {r['pair_us']:.1f} us, its shrink launched plainly "
                     f"{r['pair_plain_shrink_us']:.1f}, plain launches {r['plain_us']:.1f}; "
                     f"fused {r['fused_us']:.1f} us; one pass {r['onepass_us']:.1f} us, "
                     f"{r['onepass_parts']} parts, twice as many {r['onepass_2x_us']:.1f})")
        if "per_module_us" in r:
            extra = (f" ({r['path']}; group pair {r['group_pair_us']:.1f} us, fused "
                     f"{r['fused_us']:.1f} us, one pass {r['onepass_us']:.1f} us, "
                     f"per module, 6 launches: "
                     f"{r['per_module_us']:.1f} us)")
        if "gemm_us" in r:
            plain = (f"; launched plainly it adds {r['added_plain_us']:.1f}"
                     if "added_plain_us" in r else "")
            extra = (f" ({r['path']}; GEMM and next kernel {r['gemm_us']:.1f} us, with the "
                     f"LoRA {r['with_us']:.1f}{plain})")
        lines.append(f"| {r['section']} | {r['config']} | {r['time_us']:.1f} | "
                     f"{r['rate']:.1f} {r['unit']} | {r['pct']:.1f}% {limit}{extra} | "
                     f"{speedup} | {judge(r)} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> str | None:
    """Draws the decode LoRA rows (% of copy bandwidth by batch) into `path`; returns why
    not where it cannot."""
    if not any(r["section"] == "decode LoRA" for r in rows):
        return "no decode LoRA rows (--sections without decode): no plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for rank, ax in zip((16, 64), axes):
        for label, pick in (("1 adapter", lambda r: r["adapters"] == 1),
                            ("32 adapters", lambda r: r["adapters"] == 32 < r["batch"]),
                            ("one adapter per token", lambda r: r["adapters"] == r["batch"])):
            pts = [r for r in rows
                   if r["section"] == "decode LoRA" and r["rank"] == rank and pick(r)]
            ax.plot([r["batch"] for r in pts], [r["pct"] for r in pts], marker="o", label=label)
        ax.axhline(60, color="gray", linestyle="--", label="target 60%")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (decode tokens)")
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(f"decode LoRA (MBGMV), rank {rank}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="folder for kernels.md, kernels.json, kernels.png")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--sections", default="decode,group,layer,prefill,prefill-layer,attention",
                    help="comma-separated: decode (LoRA), group (q,k,v LoRA), layer (decode "
                         "LoRA behind its base GEMM), prefill (LoRA), prefill-layer (prefill "
                         "LoRA behind its base GEMM), attention")
    args = ap.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",")}
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 1
    prebuild(torch.cuda.current_device(), dtypes=(DTYPE,))
    gpu = torch.cuda.get_device_name()
    copy_bw, gemm = measure_limits(args.quick)
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s",
          flush=True)
    pool = fill_pool(65536, H)  # 1 GiB of pages
    rows = bench_decode_lora(pool, copy_bw, args.quick) if "decode" in sections else []
    if "group" in sections:
        rows += bench_decode_lora_group(pool, copy_bw, args.quick)
    if "layer" in sections:
        rows += bench_decode_lora_behind_gemm(pool, copy_bw, args.quick)
    if "prefill" in sections:
        rows += bench_prefill_lora(pool, copy_bw, gemm, args.quick)
    if "prefill-layer" in sections:
        rows += bench_prefill_lora_behind_gemm(pool, gemm, args.quick)
    del pool
    torch.cuda.empty_cache()
    if "attention" in sections:
        rows += bench_decode_attention(copy_bw, args.quick)
    text = table(rows, copy_bw, gemm, gpu)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.md").write_text(text + "\n")
        (args.out / "kernels.json").write_text(json.dumps(
            dict(gpu=gpu, copy_bw=copy_bw, gemm=gemm, rows=rows), indent=1))
        why_not = plot(rows, args.out / "kernels.png")
        print(why_not or f"plot: {args.out / 'kernels.png'}")
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
