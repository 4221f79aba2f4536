"""Shared by the GPU kernel tests: the shapes of real models, tolerances, and the builders of
pools, page tables, token slots and segments (random pages, mixed ranks, rank-0 slots and
tokens with no adapter). Importing it needs neither CUDA nor CuPy."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch

from slora.kernels.torch_ref import NO_ADAPTER

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and CuPy")]
"""The pytestmark of every GPU test module."""

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DTYPES = [torch.bfloat16, torch.float16]
RANKS = (1, 8, 16, 32, 64, 128)
MAX_RANK = 128


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    """0: hidden // num_heads (Qwen3 sets its own, so num_heads * head_dim may pass hidden)."""
    sliding_window: int = 0
    """The model's attention window (Mistral); 0: none."""

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.num_heads)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a LoRA target module."""
        return {"q_proj": (self.hidden, self.q_dim), "k_proj": (self.hidden, self.kv_dim),
                "o_proj": (self.q_dim, self.hidden),
                "up_proj": (self.hidden, self.intermediate),
                "down_proj": (self.intermediate, self.hidden)}[module]


LLAMA2_7B = ModelShape("llama2-7b", 4096, 11008, 32, 32)
LLAMA2_13B = ModelShape("llama2-13b", 5120, 13824, 40, 40)
LLAMA3_8B = ModelShape("llama3-8b-gqa", 4096, 14336, 32, 8)
SMOLLM2 = ModelShape("smollm2-135m-gqa-hd64", 576, 1536, 9, 3)
QWEN25_7B = ModelShape("qwen2.5-7b-gqa7", 3584, 18944, 28, 4)
"""H = 3584: a page is 3.5 chunks of 1024 elements; 7 query heads per KV head."""
QWEN3_8B = ModelShape("qwen3-8b", 4096, 12288, 32, 8, head_dim=128)
QWEN3_06B = ModelShape("qwen3-0.6b-q-wider", 1024, 3072, 16, 8, head_dim=128)
"""q is 2048 wide, twice the page: q_proj's B and o_proj's A rows span two pages; K/V fill
the page half exactly (kv_dim = H)."""
MISTRAL_7B = ModelShape("mistral-7b-w4096", 4096, 14336, 32, 8, sliding_window=4096)
"""Its LoRA shapes are Llama-3-8B's: it is in the attention shapes only."""
LORA_SHAPES = [LLAMA2_7B, LLAMA2_13B, LLAMA3_8B, QWEN25_7B, QWEN3_8B, QWEN3_06B]
ATTN_SHAPES = [LLAMA2_7B, LLAMA2_13B, LLAMA3_8B, SMOLLM2, QWEN25_7B, QWEN3_8B, QWEN3_06B,
               MISTRAL_7B]
MODULES = ["q_proj", "k_proj", "up_proj", "down_proj"]
MODULE_CASES = [(shape, module) for shape in LORA_SHAPES for module in MODULES] + [
    (QWEN3_06B, "o_proj")]
"""(shape, module) of the single-module tests: o_proj only where its d_in (num_heads *
head_dim) is not the hidden size, as q_proj's is otherwise."""


def case_id(value) -> str:
    """Test ids: a shape by its name, anything else as pytest would."""
    return value.name if isinstance(value, ModelShape) else str(value)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out, ref, dtype, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten element?)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


@dataclass
class LoraPool:
    pool: torch.Tensor            # [num_pages, 2, H]
    page_table: torch.Tensor      # [num_slots, MAX_RANK, pages_per_row]
    ranks: torch.Tensor           # [num_slots]
    scales: torch.Tensor          # [num_slots]


def make_lora_pool(H: int, d_in: int, d_out: int, dtype, gen) -> LoraPool:
    """One slot per rank of RANKS plus a slot of rank 0, rows on randomly permuted pages."""
    ranks = list(RANKS) + [0]
    n = math.ceil(max(d_in, d_out) / H)
    used = sum(ranks) * n
    num_pages = 2 * used + 7
    pool = (torch.randn(num_pages, 2, H, device="cuda", generator=gen) * 0.05).to(dtype)
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    # Rows past a slot's rank point at random pages: the kernels must not read them.
    table = torch.randint(0, num_pages, (len(ranks), MAX_RANK, n), device="cuda",
                          generator=gen, dtype=torch.int32)
    at = 0
    for slot, r in enumerate(ranks):
        table[slot, :r] = perm[at:at + r * n].view(r, n)
        at += r * n
    scales = torch.rand(len(ranks), device="cuda", generator=gen) * 1.5 + 0.5
    return LoraPool(pool, table, torch.tensor(ranks, dtype=torch.int32, device="cuda"), scales)


def make_token_slots(num_tokens: int, num_slots: int, gen) -> torch.Tensor:
    """Every slot at least once, about a sixth of the tokens with no adapter, shuffled."""
    slots = list(range(num_slots)) + [NO_ADAPTER] * max(1, num_tokens // 6)
    extra = torch.randint(0, num_slots, (num_tokens - len(slots),), generator=gen,
                          device="cuda").tolist()
    slots = torch.tensor(slots + extra, dtype=torch.int32, device="cuda")
    return slots[torch.randperm(num_tokens, device="cuda", generator=gen)].contiguous()


def make_segments(first_row: int, lengths: list[int], num_slots: int, gen):
    """Segments of the given lengths after `first_row` decode rows; slots include none."""
    starts = [first_row]
    for n in lengths:
        starts.append(starts[-1] + n)
    slots = [(i * 5 + 3) % (num_slots + 1) - 1 for i in range(len(lengths))]  # -1: NO_ADAPTER
    token_slots = torch.full((starts[-1],), NO_ADAPTER, dtype=torch.int32)
    for i, s in enumerate(slots):
        token_slots[starts[i]:starts[i + 1]] = s
    cuda = lambda v: torch.tensor(v, dtype=torch.int32, device="cuda")  # noqa: E731
    return cuda(starts), cuda(slots), token_slots.cuda()


SEG_LENGTHS = [1, 17, 64, 100, 130, 7, 200, 65]


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn() captured in a CUDA graph on a side stream (after a warm-up run there)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def make_group_pool(H: int, d_in: int, widths: list[int], dtype, gen):
    """One module per width in one pool, every module's tables stacked; the slots' ranks
    (RANKS and 0) rotate from module to module, rows on randomly permuted pages, rows past a
    rank on random pages."""
    ranks_list = list(RANKS) + [0]
    num_modules, num_slots = len(widths), len(ranks_list)
    n = math.ceil(max(d_in, *widths) / H)
    ranks = [[ranks_list[(s + m) % num_slots] for s in range(num_slots)]
             for m in range(num_modules)]
    num_pages = 2 * sum(map(sum, ranks)) * n + 7
    pool = (torch.randn(num_pages, 2, H, device="cuda", generator=gen) * 0.05).to(dtype)
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    table = torch.randint(0, num_pages, (num_modules, num_slots, MAX_RANK, n), device="cuda",
                          generator=gen, dtype=torch.int32)
    at = 0
    for m in range(num_modules):
        for s, r in enumerate(ranks[m]):
            table[m, s, :r] = perm[at:at + r * n].view(r, n)
            at += r * n
    scales = torch.rand(num_modules, num_slots, device="cuda", generator=gen) * 1.5 + 0.5
    members, col = [], 0
    for m, w in enumerate(widths):
        members.append((m, col, w))
        col += w
    group = torch.tensor(members, dtype=torch.int32, device="cuda")
    return pool, table, torch.tensor(ranks, dtype=torch.int32, device="cuda"), scales, group, col


def group_dims(shape: ModelShape, group: str) -> tuple[int, list[int]]:
    """(d_in, member widths) of a fused projection's LoRA group."""
    return {"qkv": (shape.hidden, [shape.q_dim, shape.kv_dim, shape.kv_dim]),
            "gate_up": (shape.hidden, [shape.intermediate, shape.intermediate]),
            "o": (shape.q_dim, [shape.hidden]),
            "down": (shape.intermediate, [shape.hidden])}[group]


def make_kv_pool(shape: ModelShape, context_lens: list[int], dtype, gen):
    """A pool holding each request's context on randomly permuted pages, and its page table."""
    total = sum(context_lens)
    num_pages = total + 13
    pool = torch.randn(num_pages, 2, shape.hidden, device="cuda", generator=gen).to(dtype)
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    max_ctx = max(context_lens)
    table = torch.randint(0, num_pages, (len(context_lens), max_ctx + 3), device="cuda",
                          generator=gen, dtype=torch.int32)
    at = 0
    for b, ctx in enumerate(context_lens):
        table[b, :ctx] = perm[at:at + ctx]
        at += ctx
    return pool, table, torch.tensor(context_lens, dtype=torch.int32, device="cuda")


def check_behind_gemm(gen, dtype, num_tokens, d_in, width, lora, lora_delta, what,
                      scratch=None):
    """The worker's order: x made by a kernel, the base GEMM y = x @ W^T, then lora(y, x)
    twice in a row (the second right behind the first's last kernel, as bench/kernels.py
    replays them), eagerly and over graph replays on new x with y (and `scratch`) poisoned:
    y must be the base plus twice lora_delta(x). A launch that wrote its scratch before the
    kernel before it had read it, or read y before the kernel before it was done, fails."""
    w = (torch.randn(width, d_in, device="cuda", generator=gen) * d_in ** -0.5).to(dtype)
    x = torch.empty(num_tokens, d_in, device="cuda", dtype=dtype)
    x_src = torch.empty_like(x)
    y = torch.empty(num_tokens, width, device="cuda", dtype=dtype)

    def step():
        torch.mul(x_src, 1.0, out=x)  # two kernels before the first LoRA launch
        torch.matmul(x, w.T, out=y)
        for _ in range(2):
            lora(y, x)

    def reference():
        base = (x.float() @ w.float().T).to(dtype)
        return base + 2 * lora_delta(x, torch.zeros_like(y)).float()

    x_src.copy_(torch.randn(num_tokens, d_in, device="cuda", generator=gen))
    step()
    assert_close(y.float(), reference(), dtype, f"{what}, eager")
    graph = capture(step)
    for replay in range(3):
        x_src.copy_(torch.randn(num_tokens, d_in, device="cuda", generator=gen))
        y.fill_(float("nan"))
        if scratch is not None:
            scratch.fill_(float("nan"))
        graph.replay()
        assert_close(y.float(), reference(), dtype, f"{what}, graph replay {replay}")
