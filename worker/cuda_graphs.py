"""CUDA graphs of decode-only steps: one per batch-size bucket, with and without LoRA.

Why: a Llama-7B decode step is over a thousand kernel launches. Launched one by one from
Python (about 24 µs each for a CuPy kernel, several µs for a torch op) they take longer than
the step's memory floor; replayed from a graph they cost a few µs each on the GPU and nothing
on the host. So every decode-only step replays a graph; prefill and mixed steps, whose shapes
vary and whose work is large next to their launches, run eagerly.

What a graph holds: the step's page-table write (its new tokens' page ids), the gather of the
batch's page-table rows, and the model's forward pass to float32 logits of every row
(worker/batch.py `StepInputs.forward_batch`, then `LlamaModel.forward`). Its inputs are views
of StepInputs' device buffer at fixed offsets, so a replay reads whatever the step copied
there; the LoRA tables and the pool are persistent tensors. Sampling stays outside: it is per
request (greedy, temperature, top-k/p, seeded generators) and reads the rows of the graph's
logits that the step needs.

Buckets and padding: a batch of n decode requests replays the smallest bucket >= n (1, 2, 4,
..., up to the largest decode batch, max_num_seqs). Rows past n are padding that the worker
wrote (StepInputs.write_padding): token 0 at position 0, no adapter, K/V into the pool's
scratch page, page-table row `scratch_row`, context of one token; their logits are ignored.
Each bucket is captured twice: with the LoRA kernels (any token with an adapter) and without
(the base model alone), since a graph cannot skip its kernels.

Decode attention splits each context over blocks by `max_context_len`; a graph keeps that
split fixed, so it is captured with max_context_len = max_model_len and the kernel's blocks
past a request's context exit at once.

Memory: all graphs share one memory pool, captured from the largest bucket down so that the
smaller ones reuse its blocks. That is safe because replays are serial on one stream and each
replay's logits are consumed (sampled) before the next replay is queued.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter
from typing import Callable

import torch

BUCKET_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bucket_sizes(max_batch: int) -> list[int]:
    """The buckets for decode batches of up to `max_batch` requests (max_batch included)."""
    return [b for b in BUCKET_SIZES if b < max_batch] + [max_batch]


class DecodeGraphs:
    """Captured decode steps, keyed by (bucket size, any_lora).

    `forward(size, any_lora)` queues one padded decode step of `size` rows on the current
    stream and returns its logits [size, vocab]; the worker gives it, with its inputs already
    holding valid (padding) rows up to the largest bucket."""

    def __init__(self, forward: Callable[[int, bool], torch.Tensor], max_batch: int,
                 device: torch.device):
        self.sizes = bucket_sizes(max_batch)
        self.device = device
        self._forward = forward
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays: Counter[int] = Counter()
        """Replays per bucket size (tests check that batches hit the buckets they expect)."""
        self.capture_time_s = 0.0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_reqs: int) -> int:
        """The bucket a decode batch of num_reqs replays; 0 when it is larger than all."""
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else 0

    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for any_lora in (True, False):
            for size in reversed(self.sizes):
                # One eager run first: kernels loaded, cuBLAS set up for this shape.
                self._forward(size, any_lora)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size, any_lora)
                self._graphs[(size, any_lora)] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self.capture_time_s = time.perf_counter() - start

    def replay(self, size: int, any_lora: bool) -> torch.Tensor:
        """Replays a bucket's graph on the current stream; returns its logits buffer
        [size, vocab] float32 (valid until the next replay)."""
        graph, logits = self._graphs[(size, any_lora)]
        graph.replay()
        self.num_replays[size] += 1
        return logits
