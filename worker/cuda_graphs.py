"""CUDA graphs of whole steps: decode-only steps by batch size, and steps with prefill
tokens ("mixed": prefill chunks, with or without decode tokens) by token count; each for a
set of LoRA projections.

Why: a Llama-7B step is over a thousand kernel launches. Launched one by one from Python
(about 24 µs each for a CuPy kernel, several µs for a torch op) they take longer than a
decode step's memory floor, and with LoRA longer than a prefill chunk of a few hundred
tokens takes on the tensor cores. Replayed from a graph they cost a few µs each on the GPU
and nothing on the host. Steps larger than every bucket run eagerly (their GEMMs hide the
launches).

What a graph holds: the step's page-table write (its new tokens' page ids), the gather of
the batch's page-table rows, and the model's forward pass to float32 logits (worker/batch.py
`StepInputs.forward_batch`, then models/decoder.py `CausalLM.forward`). Its inputs are views of StepInputs'
device buffer at fixed offsets, so a replay reads whatever the step copied there; the LoRA
tables and the pool are persistent tensors. Sampling stays outside: it is per request
(greedy, temperature, top-k/p, seeded generators) and reads the rows of the graph's logits
that the step needs.

Decode graphs: a batch of n decode requests replays the smallest bucket >= n (1, 2, 4, ...,
up to max_num_seqs); rows past n are padding (StepInputs writes them): token 0 at position 0,
no adapter, K/V into the pool's scratch page, page-table row `scratch_row`, context of one
token; their logits are ignored. Decode attention splits each context over blocks by
`max_context_len`; a graph keeps that split fixed, so it is captured with max_context_len =
max_model_len and the kernel's blocks past a request's context exit at once.

Mixed graphs: a step with nd decode tokens and T prefill tokens replays the graph of shape
(D, S), D the smallest of MIXED_DECODE_ROWS (capped at max_reqs) >= nd, S the smallest token
bucket >= T. Rows [0, D) are decode rows, run by the kernels a decode graph runs (split-context
decode attention, MBGMV LoRA), the step's own first and padding after them; rows [D, D + S)
are prefill tokens (causal tensor-core attention, MBGMM LoRA segments), padded likewise. The
prefill requests, one LoRA segment each, are padded to `mixed_prefill_reqs(S)` by empty
entries (each holds at least two tokens: a request with one new token is a decode row); the
logits are those of max_reqs rows, the step's sampled rows first. The kernels find their
tiles through the segment and query offsets on the device, so padding costs blocks that
exit at once. (Decode tokens run as one-token prefill queries instead took 1.5x the
attention time: bench/profile_step.py.)

LoRA sets: a graph cannot skip kernels, so each bucket is captured per set of projections
that carry LoRA: at start-up with none (the base model alone) and with all of the family's
LoRA targets; on first
use, for the set of projections that a step's adapters target (S-LoRA's workloads target
q, k, v, o, say), all buckets at once, up to `MAX_LORA_SETS` sets. A step whose set has no
graphs replays the all-projection graphs: LoRA kernels of a projection no adapter targets
find rank 0 and exit.

Who calls whom: the executor drives capture (it owns the model and the inputs) and asks this
cache which shapes to capture and which graph a step replays; the batch builder asks it for
a step's bucket. This module calls neither back.

Memory: all graphs share one memory pool, captured from the largest bucket down so that the
smaller ones reuse its blocks. That is safe because replays are serial on one stream and each
replay's logits are consumed (sampled) before the next replay is queued.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
from collections import Counter

import torch

log = logging.getLogger(__name__)

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MIXED_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)
"""Prefill token counts of mixed graphs. Above 2048 tokens a step's GEMMs take longer than
launching it eagerly, and padding would cost more than a graph saves."""
MIXED_DECODE_ROWS = (16, 64, 256)
"""Decode rows of mixed graphs (and max_reqs): few, since each multiplies the mixed graphs;
padding rows cost GEMM rows, which are nearly free next to the prefill tokens'."""
MAX_LORA_SETS = 4
"""Sets of LoRA projections with graphs of their own, besides none and all."""
NO_MODULES: frozenset[str] = frozenset()

DECODE, MIXED = "decode", "mixed"


def bucket_sizes(max_batch: int) -> list[int]:
    """The buckets for decode batches of up to `max_batch` requests (max_batch included)."""
    return [b for b in DECODE_BUCKETS if b < max_batch] + [max_batch]


def mixed_bucket_sizes(max_num_tokens: int) -> list[int]:
    """The token buckets of mixed steps of up to `max_num_tokens` tokens."""
    sizes = [b for b in MIXED_BUCKETS if b < max_num_tokens]
    if max_num_tokens <= MIXED_BUCKETS[-1]:
        sizes.append(max_num_tokens)
    return sizes


def mixed_decode_sizes(max_batch: int) -> list[int]:
    """The decode rows of mixed graphs for steps of up to `max_batch` requests."""
    return [d for d in MIXED_DECODE_ROWS if d < max_batch] + [max_batch]


def mixed_prefill_reqs(num_tokens: int, max_reqs: int) -> int:
    """Prefill requests a mixed graph of `num_tokens` prefill rows holds: each has at least
    two tokens."""
    return max(1, min(max_reqs, num_tokens // 2))


def _bucket(sizes: list[int], n: int) -> int:
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else 0


MixedShape = tuple[int, int]
"""(decode rows, prefill token rows) of a mixed graph."""
GraphKey = tuple[str, "int | MixedShape", frozenset]


def _num_rows(size: "int | MixedShape") -> int:
    return size if isinstance(size, int) else sum(size)


class StepGraphs:
    """Captured steps, keyed by (kind, bucket size, LoRA projections): which to capture, which
    a step replays, and the replays themselves. A decode graph's logits are [size, vocab], a
    mixed one's [max_reqs, vocab]."""

    def __init__(self, all_modules: frozenset, max_batch: int, max_num_tokens: int,
                 device: torch.device):
        self.all_modules = all_modules
        """Every projection the model's adapters may target."""
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = max_batch
        self.mixed_sizes = mixed_bucket_sizes(max_num_tokens)
        self.mixed_decode_sizes = mixed_decode_sizes(max_batch)
        self.device = device
        self._pool = None
        self._graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_sets: list[frozenset] = []
        """The LoRA projection sets captured, in order."""
        self.num_replays: Counter[int] = Counter()
        """Decode replays per bucket size (tests check the buckets batches hit)."""
        self.num_mixed_replays: Counter[MixedShape] = Counter()
        self.capture_time_s = 0.0

    def bucket(self, num_reqs: int) -> int:
        """The bucket a decode batch of num_reqs replays; 0 when it is larger than all."""
        return _bucket(self.sizes, num_reqs)

    def mixed_bucket(self, num_decode: int, num_prefill: int) -> MixedShape | None:
        """The (D, S) a step of num_decode decode tokens and num_prefill prefill tokens
        replays; None when its prefill is larger than every bucket."""
        s = _bucket(self.mixed_sizes, num_prefill)
        if not s:
            return None
        return _bucket(self.mixed_decode_sizes, num_decode), s

    def mixed_prefill_reqs(self, num_tokens: int) -> int:
        return mixed_prefill_reqs(num_tokens, self.max_batch)

    def lora_set(self, modules: frozenset) -> frozenset:
        """The set a step whose adapters target `modules` replays: its own when captured or
        when there is room to capture it (`is_captured` says which), else all projections."""
        if not modules:
            return NO_MODULES
        if modules in self.lora_sets or len(self.lora_sets) < MAX_LORA_SETS + 2:
            return modules
        return self.all_modules

    def is_captured(self, modules: frozenset) -> bool:
        return modules in self.lora_sets

    def startup_sets(self) -> list[frozenset]:
        """The sets every worker captures at start: LoRA on every projection, and none."""
        return [self.all_modules, NO_MODULES]

    def shapes(self) -> list[tuple[str, "int | MixedShape"]]:
        """Every bucket of both kinds, largest first: the others reuse its memory."""
        shapes = [(MIXED, (d, s)) for d in self.mixed_decode_sizes
                  for s in self.mixed_sizes] + [(DECODE, s) for s in self.sizes]
        return sorted(shapes, key=lambda shape: -_num_rows(shape[1]))

    @contextlib.contextmanager
    def recording(self, kind: str, size: "int | MixedShape", modules: frozenset):
        """Captures what the block queues on the current stream as the graph of (kind,
        size, modules); the block puts the step's logits tensor in the dict it is given."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, out = torch.cuda.CUDAGraph(), {}
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            yield out
        self._graphs[(kind, size, modules)] = (graph, out["logits"])

    def captured(self, modules: frozenset, took_s: float) -> None:
        """Every shape of `modules` is recorded."""
        self.lora_sets.append(modules)
        self.capture_time_s += took_s
        log.info("captured %d step graphs for LoRA on %s in %.2f s", len(self.shapes()),
                 ",".join(sorted(modules)) or "no projection", took_s)

    def replay(self, kind: str, size: "int | MixedShape", modules: frozenset) -> torch.Tensor:
        """Replays a graph on the current stream; returns its logits buffer (valid until
        the next replay)."""
        graph, logits = self._graphs[(kind, size, modules)]
        graph.replay()
        (self.num_replays if kind == DECODE else self.num_mixed_replays)[size] += 1
        return logits
