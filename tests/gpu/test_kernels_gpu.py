"""The CUDA kernels against their torch references, on shapes real models have.

Every test draws fresh random inputs (never zeros), scatters the pool's pages with a random
permutation so nothing is contiguous, mixes ranks 1..128, a slot whose module is not targeted
(rank 0) and tokens with no adapter in one batch, and poisons outputs with NaN before the run so
an element the kernel forgot fails. Errors are ||out - ref|| / ||ref|| against a tolerance looked
up by dtype. Marked `gpu`: run with `pytest -m gpu`; skipped without CUDA or CuPy (importing
this module needs neither).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch

from slora.kernels import torch_ref
from slora.kernels.backend import NO_WINDOW, AttentionBatch, LoraBatch, LoraGroup, LoraTables
from slora.kernels.torch_backend import TorchBackend
from slora.kernels.torch_ref import NO_ADAPTER

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and CuPy")]

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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a LoRA target module."""
        return {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, self.kv_dim),
                "up_proj": (self.hidden, self.intermediate),
                "down_proj": (self.intermediate, self.hidden)}[module]


LLAMA2_7B = ModelShape("llama2-7b", 4096, 11008, 32, 32)
LLAMA2_13B = ModelShape("llama2-13b", 5120, 13824, 40, 40)
LLAMA3_8B = ModelShape("llama3-8b-gqa", 4096, 14336, 32, 8)
SMOLLM2 = ModelShape("smollm2-135m-gqa-hd64", 576, 1536, 9, 3)
LORA_SHAPES = [LLAMA2_7B, LLAMA2_13B, LLAMA3_8B]
ATTN_SHAPES = [LLAMA2_7B, LLAMA2_13B, LLAMA3_8B, SMOLLM2]
MODULES = ["q_proj", "k_proj", "up_proj", "down_proj"]


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


# ---- LoRA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens", [13, 64])  # mbgmv_shrink; mbgmv_shrink_staged
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_shrink_matches_reference(L, gen, shape, module, dtype, num_tokens):
    """Decode shrink: mixed ranks, no-adapter tokens, rank-0 slot; every v element written."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    out = torch.full((num_tokens, MAX_RANK), float("nan"), device="cuda")
    L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots, out=out)
    ref = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots)
    # bf16/fp16 products are exact in float32: only the order of the sums differs.
    assert_close(out, ref, torch.float32, f"{shape.name} {module} shrink")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_expand_matches_reference(L, gen, shape, module, dtype):
    """Decode expand accumulates into y in place and leaves no-adapter rows untouched."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(64, lp.ranks.shape[0], gen)
    v = torch.randn(64, MAX_RANK, device="cuda", generator=gen)
    y0 = torch.randn(64, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand(y, v, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    ref = torch_ref.lora_expand(y0.clone(), v, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    assert_close(y, ref, dtype, f"{shape.name} {module} expand")
    untouched = (slots == NO_ADAPTER) | (lp.ranks[slots.clamp_min(0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_decode_pair_matches_reference(L, gen, shape, module, dtype):
    """lora_decode: the shrink prefetching B^T into L2 and the expand launched behind it with
    programmatic dependent launch (Hopper) give the reference's y, eagerly and replayed from a
    CUDA graph on new inputs (an expand that read v before its shrink wrote it would keep the
    previous replay's v)."""
    from slora.kernels.cuda_compile import pdl_available
    if torch.cuda.get_device_capability()[0] >= 9:
        assert pdl_available(torch.cuda.current_device())
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(64, lp.ranks.shape[0], gen)
    x = torch.randn(64, d_in, device="cuda", generator=gen).to(dtype)
    y0 = torch.randn(64, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_decode(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    ref = torch_ref.lora_expand(y0.clone(), torch_ref.lora_shrink(
        x, lp.pool, lp.page_table, lp.ranks, slots), lp.pool, lp.page_table, lp.ranks,
        lp.scales, slots)
    assert_close(y, ref, dtype, f"{shape.name} {module} decode pair")
    untouched = (slots == NO_ADAPTER) | (lp.ranks[slots.clamp_min(0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])

    def step():
        y.copy_(y0)
        L.lora_decode(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)

    graph = capture(step)
    for replay in range(3):
        x.copy_(torch.randn(64, d_in, device="cuda", generator=gen).to(dtype))
        y.fill_(float("nan"))
        graph.replay()
        ref = torch_ref.lora_expand(y0.clone(), torch_ref.lora_shrink(
            x, lp.pool, lp.page_table, lp.ranks, slots), lp.pool, lp.page_table, lp.ranks,
            lp.scales, slots)
        assert_close(y, ref, dtype, f"{shape.name} {module} decode pair, graph replay {replay}")


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


def reference_delta(lp, slots):
    """delta(x, y): the reference's LoRA of x added into y, in place (check_behind_gemm
    passes zeros)."""
    def delta(x, y):
        return torch_ref.lora_expand(y, torch_ref.lora_shrink(
            x, lp.pool, lp.page_table, lp.ranks, slots), lp.pool, lp.page_table, lp.ranks,
            lp.scales, slots)
    return delta


@pytest.mark.parametrize("num_tokens", [13, 64])  # mbgmv_shrink; mbgmv_shrink_staged
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", ["q_proj", "k_proj", "down_proj"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_decode_pair_overlapping_the_kernel_before(L, gen, shape, module, dtype,
                                                         num_tokens):
    """lora_decode(overlap_previous=True) behind the base GEMM and behind itself, on one v
    buffer (check_behind_gemm)."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)
    v = torch.empty(num_tokens, lp.page_table.shape[1], device="cuda")

    def lora(y, x):
        L.lora_decode(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots, v_out=v,
                      overlap_previous=True)

    delta = reference_delta(lp, slots)

    check_behind_gemm(gen, dtype, num_tokens, d_in, d_out, lora, delta,
                      f"{shape.name} {module} {num_tokens} tokens, pair behind the GEMM", v)


def check_onepass(L, gen, shape, module, dtype, num_tokens, parts=None):
    """lora_decode_onepass against the reference: mixed ranks, no-adapter tokens and a
    rank-0 slot left exactly as they were, no element far off."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    # Small y: the output is mostly the LoRA delta, so a row group left out shows.
    y0 = (torch.randn(num_tokens, d_out, device="cuda", generator=gen) * 0.01).to(dtype)
    y = y0.clone()
    L.lora_decode_onepass(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots,
                          parts=parts)
    ref = reference_delta(lp, slots)(x, y0.clone())
    what = f"{shape.name} {module} {num_tokens} tokens one pass, parts {parts}"
    assert_close(y, ref, dtype, what)
    worst = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert worst < 2 * TOL[dtype], f"{what}: an element is off by {worst:.2e} of the largest"
    untouched = (slots == NO_ADAPTER) | (lp.ranks[slots.clamp_min(0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])


@pytest.mark.parametrize("num_tokens", [13, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_onepass_matches_reference(L, gen, shape, module, dtype, num_tokens):
    """Decode shrink and expand in one launch (mbgmv_onepass: each block adds its rows'
    part into y by vector reductions)."""
    check_onepass(L, gen, shape, module, dtype, num_tokens)


@pytest.mark.parametrize("parts", [1, 3, 8, 1000])
def test_mbgmv_onepass_any_number_of_parts(L, gen, parts):
    """Whatever the blocks per token (1: one block takes every row group; 3: blocks with
    different numbers of groups; 1000: clamped to one block per group of 4 rows), the result
    is the same; also for the fp32 pool and the 13B shapes (H = 5120, down's d_in 13824 over
    three page columns). Beyond ONEPASS_MAX_PARTS, y's roundings (one per part) add up past
    bf16's tolerance for rank 128, so 1000 is checked with the fp32 pool only."""
    if parts <= 8:
        check_onepass(L, gen, LLAMA2_7B, "q_proj", torch.bfloat16, 13, parts)
        check_onepass(L, gen, LLAMA2_13B, "down_proj", torch.float16, 13, parts)
    check_onepass(L, gen, LLAMA3_8B, "up_proj", torch.float32, 13, parts)
    check_fused(L, gen, LLAMA3_8B, "qkv", torch.float32, 13, parts, how="one pass")


@pytest.mark.parametrize("num_tokens", [13, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", ["q_proj", "k_proj", "down_proj"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_onepass_overlapping_the_kernel_before(L, gen, shape, module, dtype,
                                                     num_tokens):
    """lora_decode_onepass(overlap_previous=True) behind the base GEMM and behind itself
    (check_behind_gemm): a block that added into y before the GEMM wrote it, or read x
    before the kernel making it was done, fails."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(num_tokens, lp.ranks.shape[0], gen)

    def lora(y, x):
        L.lora_decode_onepass(y, x, lp.pool, lp.page_table, lp.ranks, lp.scales, slots,
                              overlap_previous=True)

    delta = reference_delta(lp, slots)

    check_behind_gemm(gen, dtype, num_tokens, d_in, d_out, lora, delta,
                      f"{shape.name} {module} {num_tokens} tokens, one pass behind the GEMM")


@pytest.mark.parametrize("num_tokens", [13, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("pair", [False, True], ids=["fused", "group-pair"])
def test_mbgmv_fused_overlapping_the_kernel_before(L, gen, shape, dtype, num_tokens, pair):
    """lora_shrink_expand and lora_decode_group (overlap_previous=True) for q, k, v behind
    the fused qkv GEMM and behind themselves (check_behind_gemm)."""
    d_in, widths = group_dims(shape, "qkv")
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    slots = make_token_slots(num_tokens, ranks.shape[1], gen)
    launcher = L.lora_decode_group if pair else L.lora_shrink_expand

    def lora(y, x):
        launcher(y, x, pool, table, ranks, scales, slots, group, max_d_out=max(widths),
                 overlap_previous=True)

    def delta(x, zeros):
        return torch_ref.lora_shrink_expand(zeros, x, pool, table, ranks, scales, slots, group)

    what = "group pair" if pair else "fused"
    check_behind_gemm(gen, dtype, num_tokens, d_in, width, lora, delta,
                      f"{shape.name} qkv {num_tokens} tokens, {what} behind the GEMM")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmm_group_pair_behind_the_gemm(L, gen, shape, dtype, mbgmm_tile):
    """lora_shrink_expand_segments for q, k, v (its expand launched behind its shrink)
    behind the fused qkv GEMM and behind itself (check_behind_gemm): an expand that read v
    before the shrink was done, or wrote y before the GEMM was, fails."""
    d_in, widths = group_dims(shape, "qkv")
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(0, SEG_LENGTHS, ranks.shape[1], gen)

    def lora(y, x):
        L.lora_shrink_expand_segments(y, x, pool, table, ranks, scales, seg_starts, seg_slots,
                                      group, max_d_out=max(widths))

    def delta(x, zeros):
        return torch_ref.lora_shrink_expand(zeros, x, pool, table, ranks, scales, token_slots,
                                            group)

    check_behind_gemm(gen, dtype, token_slots.shape[0], d_in, width, lora, delta,
                      f"{shape.name} qkv prefill segments, pair behind the GEMM")


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
    return {"qkv": (shape.hidden, [shape.hidden, shape.kv_dim, shape.kv_dim]),
            "gate_up": (shape.hidden, [shape.intermediate, shape.intermediate]),
            "o": (shape.hidden, [shape.hidden]),
            "down": (shape.intermediate, [shape.hidden])}[group]


def check_fused(L, gen, shape, group_name, dtype, num_tokens, num_chunks=None, how="fused"):
    """lora_shrink_expand (how="fused"; num_chunks: its blocks per token), lora_decode_group
    ("group pair") or lora_decode_onepass_group ("one pass"; num_chunks: its parts) against
    the reference."""
    d_in, widths = group_dims(shape, group_name)
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    slots = make_token_slots(num_tokens, ranks.shape[1], gen)
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    # Small y: the output is mostly the LoRA delta, so a delta left out shows.
    y0 = (torch.randn(num_tokens, width, device="cuda", generator=gen) * 0.01).to(dtype)
    y = y0.clone()
    if how == "group pair":
        L.lora_decode_group(y, x, pool, table, ranks, scales, slots, group,
                            max_d_out=max(widths))
    elif how == "one pass":
        L.lora_decode_onepass_group(y, x, pool, table, ranks, scales, slots, group,
                                    max_d_out=max(widths), parts=num_chunks)
    else:
        L.lora_shrink_expand(y, x, pool, table, ranks, scales, slots, group,
                             max_d_out=max(widths), num_chunks=num_chunks)
    ref = torch_ref.lora_shrink_expand(y0.clone(), x, pool, table, ranks, scales, slots, group)
    what = f"{shape.name} {group_name} {how}, {num_tokens} tokens, chunks {num_chunks}"
    assert_close(y, ref, dtype, what)
    worst = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert worst < 2 * TOL[dtype], f"{what}: an element is off by {worst:.2e} of the largest"
    assert torch.equal(y[slots == NO_ADAPTER], y0[slots == NO_ADAPTER])


@pytest.mark.parametrize("how", ["fused", "group pair", "one pass"])
@pytest.mark.parametrize("num_tokens", [13, 64])  # pair: mbgmv_shrink; mbgmv_shrink_staged
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_name", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmv_fused_group_matches_reference(L, gen, shape, group_name, dtype, num_tokens,
                                             how):
    """Decode shrink + expand for a module group (q, k, v into the fused output's columns;
    gate and up; down with d_in 11008..14336) in one launch (fused, one pass) or one launch
    each (lora_decode_group: members on grid.z): ranks differ per module and slot, rank-0
    modules and no-adapter tokens are left as they were."""
    check_fused(L, gen, shape, group_name, dtype, num_tokens, how=how)


@pytest.mark.parametrize("num_chunks", [1, 3, 1000])
def test_mbgmv_fused_any_number_of_chunks(L, gen, num_chunks):
    """Whatever the blocks per token (1: one block computes everything; 1000: clamped to a
    unit each), the result is the same; also for the fp32 pool and the 13B shapes
    (H = 5120, down's d_in 13824 over three page columns)."""
    check_fused(L, gen, LLAMA2_7B, "qkv", torch.bfloat16, 13, num_chunks)
    check_fused(L, gen, LLAMA2_13B, "down", torch.float16, 13, num_chunks)
    check_fused(L, gen, LLAMA3_8B, "o", torch.float32, 13, num_chunks)


@pytest.fixture(params=[64, 128], ids=lambda n: f"tile-{n}")
def mbgmm_tile(L, request):
    """Runs the test with the MBGMM shrink and expand on tiles of 64 and of 128 tokens (the
    launchers pick by the segments' average length)."""
    saved = L.routing.SHRINK_TILE, L.routing.EXPAND_TILE
    L.routing.SHRINK_TILE = L.routing.EXPAND_TILE = request.param
    yield request.param
    L.routing.SHRINK_TILE, L.routing.EXPAND_TILE = saved


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmm_shrink_segments_matches_reference(L, gen, shape, module, dtype,
                                                 mbgmm_tile):
    """Prefill shrink on tensor cores over segments of odd lengths, one adapter each."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(5, SEG_LENGTHS, lp.ranks.shape[0], gen)
    x = torch.randn(token_slots.shape[0], d_in, device="cuda", generator=gen).to(dtype)
    out = L.lora_shrink_segments(x, lp.pool, lp.page_table, lp.ranks, seg_starts, seg_slots)
    ref = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, token_slots)
    assert_close(out, ref, torch.float32, f"{shape.name} {module} segment shrink")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmm_expand_segments_matches_reference(L, gen, shape, module, dtype,
                                                 mbgmm_tile):
    """Prefill expand on tensor cores; rows outside segments and no-adapter segments untouched."""
    d_in, d_out = shape.module_dims(module)
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(5, SEG_LENGTHS, lp.ranks.shape[0], gen)
    n = token_slots.shape[0]
    v = torch.randn(n, MAX_RANK, device="cuda", generator=gen)
    y0 = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand_segments(y, v, lp.pool, lp.page_table, lp.ranks, lp.scales, seg_starts,
                           seg_slots)
    ref = torch_ref.lora_expand(y0.clone(), v, lp.pool, lp.page_table, lp.ranks, lp.scales,
                                token_slots)
    assert_close(y, ref, dtype, f"{shape.name} {module} segment expand")
    untouched = token_slots == NO_ADAPTER
    assert torch.equal(y[untouched], y0[untouched])


MANY_SEG_LENGTHS = [(i * 37) % 23 + 2 for i in range(60)]
"""More segments than the launch has block rows: blocks loop over tiles."""


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("group_name", ["qkv", "gate_up"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: s.name)
def test_mbgmm_group_segments_match_reference(L, gen, shape, group_name, dtype,
                                              mbgmm_tile):
    """Prefill LoRA of a module group (q, k, v; gate, up) in one shrink and one expand launch:
    per-module ranks and scales, each member into its columns; no-adapter segments and the
    decode rows before the first segment untouched."""
    d_in, widths = group_dims(shape, group_name)
    pool, table, ranks, scales, group, width = make_group_pool(shape.hidden, d_in, widths,
                                                               dtype, gen)
    for lengths in (SEG_LENGTHS, MANY_SEG_LENGTHS):
        seg_starts, seg_slots, token_slots = make_segments(5, lengths, ranks.shape[1], gen)
        n = token_slots.shape[0]
        x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
        y0 = (torch.randn(n, width, device="cuda", generator=gen) * 0.01).to(dtype)
        y = y0.clone()
        L.lora_shrink_expand_segments(y, x, pool, table, ranks, scales, seg_starts, seg_slots,
                                      group, max_d_out=max(widths))
        ref = torch_ref.lora_shrink_expand(y0.clone(), x, pool, table, ranks, scales,
                                           token_slots, group)
        assert_close(y, ref, dtype, f"{shape.name} {group_name} group segments, "
                                    f"{len(lengths)} segments")
        untouched = token_slots == NO_ADAPTER
        assert torch.equal(y[untouched], y0[untouched])


def test_mbgmm_single_module_with_many_segments(L, gen, mbgmm_tile):
    """60 segments, more than the launch's block rows: the blocks loop over the tiles."""
    shape, dtype = LLAMA2_7B, torch.bfloat16
    d_in, d_out = shape.module_dims("q_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(3, MANY_SEG_LENGTHS, lp.ranks.shape[0],
                                                       gen)
    n = token_slots.shape[0]
    x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
    v = L.lora_shrink_segments(x, lp.pool, lp.page_table, lp.ranks, seg_starts, seg_slots)
    ref_v = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, token_slots)
    assert_close(v, ref_v, torch.float32, "many-segment shrink")
    y0 = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand_segments(y, ref_v, lp.pool, lp.page_table, lp.ranks, lp.scales, seg_starts,
                           seg_slots)
    ref = torch_ref.lora_expand(y0.clone(), ref_v, lp.pool, lp.page_table, lp.ranks,
                                lp.scales, token_slots)
    assert_close(y, ref, dtype, "many-segment expand")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_in,d_out,max_rank", [(600, 456, 131), (1800, 1000, 256)])
def test_mbgmm_ranks_past_one_tile_and_rows_across_pages(L, gen, d_in, d_out, max_rank, dtype,
                                                         mbgmm_tile):
    """Ranks past 128 (the shrink's second rank tile, the expand's second rank chunk), an odd
    max_rank (v rows not 8-byte aligned: scalar v reads and adds), and pages of H=200, so a
    stage of d_in and a step of d_out cross page boundaries; d_in 600 runs unsplit, 1800 split."""
    H, num_slots = 200, 6
    ranks = [1, 7, 130, max_rank, 0, 64]
    n = math.ceil(max(d_in, d_out) / H)
    num_pages = 2 * sum(ranks) * n + 7
    pool = (torch.randn(num_pages, 2, H, device="cuda", generator=gen) * 0.05).to(dtype)
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    table = torch.randint(0, num_pages, (num_slots, max_rank, n), device="cuda",
                          generator=gen, dtype=torch.int32)
    at = 0
    for slot, r in enumerate(ranks):
        table[slot, :r] = perm[at:at + r * n].view(r, n)
        at += r * n
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    scales = torch.rand(num_slots, device="cuda", generator=gen) * 1.5 + 0.5
    seg_starts, seg_slots, token_slots = make_segments(2, [70, 1, 130, 64, 9, 100, 33],
                                                       num_slots, gen)
    num_tokens = token_slots.shape[0]
    x = torch.randn(num_tokens, d_in, device="cuda", generator=gen).to(dtype)
    v = L.lora_shrink_segments(x, pool, table, ranks_t, seg_starts, seg_slots)
    ref_v = torch_ref.lora_shrink(x, pool, table, ranks_t, token_slots)
    assert_close(v, ref_v, torch.float32, f"shrink d_in {d_in} max_rank {max_rank}")
    y0 = torch.randn(num_tokens, d_out, device="cuda", generator=gen).to(dtype)
    y = y0.clone()
    L.lora_expand_segments(y, ref_v, pool, table, ranks_t, scales, seg_starts, seg_slots)
    ref = torch_ref.lora_expand(y0.clone(), ref_v, pool, table, ranks_t, scales, token_slots)
    assert_close(y, ref, dtype, f"expand d_out {d_out} max_rank {max_rank}")
    untouched = token_slots == NO_ADAPTER
    assert torch.equal(y[untouched], y0[untouched])
    group = torch.tensor([[0, 0, d_out]], dtype=torch.int32, device="cuda")
    y = y0.clone()
    L.lora_shrink_expand_segments(y, x, pool, table.unsqueeze(0), ranks_t.unsqueeze(0),
                                  scales.unsqueeze(0), seg_starts, seg_slots, group,
                                  max_d_out=d_out)
    ref = torch_ref.lora_shrink_expand(y0.clone(), x, pool, table.unsqueeze(0),
                                       ranks_t.unsqueeze(0), scales.unsqueeze(0), token_slots,
                                       group)
    assert_close(y, ref, dtype, f"shrink + expand d_in {d_in} max_rank {max_rank}")


def test_mbgmv_fp32_pool_matches_reference(L, gen):
    """float32 pools run the same decode kernels (4 elements per 16-byte vector)."""
    shape, dtype = LLAMA2_7B, torch.float32
    d_in, d_out = shape.module_dims("down_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    slots = make_token_slots(32, lp.ranks.shape[0], gen)
    x = torch.randn(32, d_in, device="cuda", generator=gen)
    out = torch.full((32, MAX_RANK), float("nan"), device="cuda")
    L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots, out=out)
    assert_close(out, torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots), dtype,
                 "fp32 shrink")
    y0 = torch.randn(32, d_out, device="cuda", generator=gen)
    y = L.lora_expand(y0.clone(), out, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    ref = torch_ref.lora_expand(y0.clone(), out, lp.pool, lp.page_table, lp.ranks, lp.scales,
                                slots)
    assert_close(y, ref, dtype, "fp32 expand")


# ---- attention ----------------------------------------------------------------------------

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


DECODE_CONTEXTS = [1, 7, 64, 65, 300, 1024, 2000, 33, 4097]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: s.name)
def test_decode_attention_matches_reference(L, gen, shape, dtype):
    """One query per request over contexts of 1..4097 positions scattered over the pool."""
    pool, table, lens = make_kv_pool(shape, DECODE_CONTEXTS, dtype, gen)
    q = torch.randn(len(DECODE_CONTEXTS), shape.num_heads, shape.head_dim, device="cuda",
                    generator=gen).to(dtype)
    scale = shape.head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    L.paged_attention_decode(q, pool, table, lens, shape.num_kv_heads, scale, out=out)
    ref = torch_ref.paged_attention_decode(q, pool, table, lens, shape.num_kv_heads, scale)
    assert_close(out, ref, dtype, f"{shape.name} decode attention")


def test_decode_attention_fp32_and_small_batch_split(L, gen):
    """fp32 pool; a batch of 2 long contexts, which the launcher splits over many blocks."""
    shape, dtype = LLAMA3_8B, torch.float32
    pool, table, lens = make_kv_pool(shape, [3000, 5], dtype, gen)
    q = torch.randn(2, shape.num_heads, shape.head_dim, device="cuda", generator=gen)
    out = torch.full_like(q, float("nan"))
    L.paged_attention_decode(q, pool, table, lens, shape.num_kv_heads, 0.1, out=out)
    ref = torch_ref.paged_attention_decode(q, pool, table, lens, shape.num_kv_heads, 0.1)
    assert_close(out, ref, dtype, "fp32 decode attention")


PREFILL_REQS = [(1, 1), (70, 70), (300, 45), (129, 129), (1000, 200), (64, 64)]  # (ctx, q_len)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: s.name)
def test_prefill_attention_matches_reference(L, gen, shape, dtype):
    """Causal attention of new tokens at the end of their contexts (some with a prefix)."""
    pool, table, lens = make_kv_pool(shape, [c for c, _ in PREFILL_REQS], dtype, gen)
    qsl = [0]
    for _, n in PREFILL_REQS:
        qsl.append(qsl[-1] + n)
    qsl = torch.tensor(qsl, dtype=torch.int32, device="cuda")
    q = torch.randn(int(qsl[-1]), shape.num_heads, shape.head_dim, device="cuda",
                    generator=gen).to(dtype)
    scale = shape.head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    L.paged_attention(q, pool, table, lens, qsl, shape.num_kv_heads, scale, out=out)
    ref = torch_ref.paged_attention(q, pool, table, lens, qsl, shape.num_kv_heads, scale)
    assert_close(out, ref, dtype, f"{shape.name} prefill attention")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", [LLAMA2_13B, LLAMA3_8B], ids=lambda s: s.name)
def test_store_kv_writes_exactly_the_tokens_pages(L, gen, shape, dtype):
    """store_kv writes K and V into the first kv_dim elements of each token's page, nothing else."""
    num_pages, n = 300, 97
    pool = torch.randn(num_pages, 2, shape.hidden, device="cuda", generator=gen).to(dtype)
    pages = torch.randperm(num_pages, device="cuda", generator=gen)[:n].to(torch.int32)
    k = torch.randn(n, shape.kv_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(n, shape.kv_dim, device="cuda", generator=gen).to(dtype)
    expected = pool.clone()
    torch_ref.store_kv(k, v, expected, pages)
    L.store_kv(k, v, pool, pages)
    assert torch.equal(pool, expected)


# ---- the backend and CUDA graphs ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_backend_matches_torch_backend_on_a_mixed_batch(L, gen, dtype):
    """Decode tokens first, then prefill segments: LoRA and attention as the worker calls them."""
    from slora.kernels.cuda_backend import CudaBackend
    shape = LLAMA3_8B
    d_in, d_out = shape.module_dims("q_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    num_decode = 12
    decode_slots = make_token_slots(num_decode, lp.ranks.shape[0], gen)
    seg_starts, seg_slots, token_slots = make_segments(num_decode, [40, 3, 90],
                                                       lp.ranks.shape[0], gen)
    token_slots[:num_decode] = decode_slots
    n = token_slots.shape[0]
    lora = LoraBatch(token_slots=token_slots, num_decode_tokens=num_decode,
                     seg_starts=seg_starts, seg_slots=seg_slots, any_lora=True)
    x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
    y0 = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
    cuda_be, torch_be = CudaBackend(), TorchBackend()
    tables = LoraTables(lp.page_table.unsqueeze(0), lp.ranks.unsqueeze(0),
                        lp.scales.unsqueeze(0))
    single = LoraGroup(((0, 0, d_out),), torch.tensor([[0, 0, d_out]], dtype=torch.int32,
                                                      device="cuda"))
    y = cuda_be.lora_group(y0.clone(), x, lp.pool, tables, single, lora)
    y_ref = torch_be.lora_group(y0.clone(), x, lp.pool, tables, single, lora)
    assert_close(y, y_ref, dtype, "backend LoRA of one module")

    # LoRA groups of the GQA shape: q, k, v and o alone (decode: the one-pass kernel on
    # Hopper, else the group's shrink and expand or, for o, MBGMV shrink and expand; prefill:
    # one MBGMM pair for the group or the module).
    dev = torch.cuda.current_device()
    hopper = L.onepass_available(dev)
    assert L.decode_lora_path(num_decode, 3, dev) == ("one pass" if hopper else "group pair")
    assert L.decode_lora_path(num_decode, 1, dev) == ("one pass" if hopper else "pair")
    for group_name in ("qkv", "o"):
        d_in, widths = group_dims(shape, group_name)
        gpool, gtable, granks, gscales, group, width = make_group_pool(shape.hidden, d_in,
                                                                       widths, dtype, gen)
        members = tuple(tuple(r) for r in group.tolist())
        xg = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
        yg0 = (torch.randn(n, width, device="cuda", generator=gen) * 0.01).to(dtype)
        gtables = LoraTables(gtable, granks, gscales)
        yg = cuda_be.lora_group(yg0.clone(), xg, gpool, gtables, LoraGroup(members, group), lora)
        yg_ref = torch_be.lora_group(yg0.clone(), xg, gpool, gtables, LoraGroup(members, group),
                                     lora)
        assert_close(yg, yg_ref, dtype, f"backend LoRA group {group_name}")

    # Attention: 12 decode requests, then 3 prefills (one with a cached prefix).
    lens = [int(c) for c in torch.randint(1, 900, (num_decode,), generator=gen,
                                          device="cuda").tolist()] + [40, 50, 90]
    q_lens = [1] * num_decode + [40, 3, 90]
    pool, table, context_lens = make_kv_pool(shape, lens, dtype, gen)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                       device="cuda")
    attn = AttentionBatch(kv_page_table=table, context_lens=context_lens, query_start_loc=qsl,
                          token_page_ids=torch.zeros(n, dtype=torch.int32, device="cuda"),
                          num_decode_reqs=num_decode, max_query_len=90,
                          max_context_len=max(lens))
    q = torch.randn(n, shape.num_heads, shape.head_dim, device="cuda", generator=gen).to(dtype)
    for window in (NO_WINDOW, 37):
        out = cuda_be.paged_attention(q, pool, attn, shape.num_kv_heads, 0.088,
                                      sliding_window=window)
        ref = torch_be.paged_attention(q, pool, attn, shape.num_kv_heads, 0.088,
                                       sliding_window=window)
        assert_close(out, ref, dtype, f"backend attention, window {window}")


def test_decode_step_kernels_replay_in_a_cuda_graph(L, gen):
    """Shrink, expand and decode attention captured once, replayed on new inputs."""
    shape, dtype = LLAMA2_7B, torch.bfloat16
    d_in, d_out = shape.module_dims("q_proj")
    lp = make_lora_pool(shape.hidden, d_in, d_out, dtype, gen)
    num_reqs = 16
    slots = make_token_slots(num_reqs, lp.ranks.shape[0], gen)
    x = torch.randn(num_reqs, d_in, device="cuda", generator=gen).to(dtype)
    y0 = torch.randn(num_reqs, d_out, device="cuda", generator=gen).to(dtype)
    y = torch.empty_like(y0)
    kv_pool, table, lens = make_kv_pool(shape, [500] * num_reqs, dtype, gen)
    q = torch.randn(num_reqs, shape.num_heads, shape.head_dim, device="cuda",
                    generator=gen).to(dtype)

    def step():
        y.copy_(y0)
        v = L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots)
        L.lora_expand(y, v, lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
        return L.paged_attention_decode(q, kv_pool, table, lens, shape.num_kv_heads, 0.088,
                                        max_context_len=table.shape[1])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # builds and loads the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn = step()

    x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
    y0.copy_(torch.randn(y0.shape, device="cuda", generator=gen))
    q.copy_(torch.randn(q.shape, device="cuda", generator=gen))
    slots.copy_(slots.flip(0))
    lens.copy_(torch.randint(1, 501, lens.shape, device="cuda", generator=gen, dtype=torch.int32))
    attn.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    v_ref = torch_ref.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots)
    y_ref = torch_ref.lora_expand(y0.clone(), v_ref, lp.pool, lp.page_table, lp.ranks,
                                  lp.scales, slots)
    assert_close(y, y_ref, dtype, "graph-replayed LoRA")
    ref = torch_ref.paged_attention_decode(q, kv_pool, table, lens, shape.num_kv_heads, 0.088)
    assert_close(attn, ref, dtype, "graph-replayed decode attention")


def test_launchers_name_the_argument_that_breaks_an_assumption(L, gen):
    """Wrong dtype, device or layout fails before launch, naming the argument."""
    lp = make_lora_pool(576, 576, 576, torch.bfloat16, gen)
    slots = make_token_slots(8, lp.ranks.shape[0], gen)
    x = torch.randn(8, 576, device="cuda", generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="x has dtype"):
        L.lora_shrink(x.half(), lp.pool, lp.page_table, lp.ranks, slots)
    with pytest.raises(ValueError, match="token_slots must be torch.int32"):
        L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks, slots.long())
    with pytest.raises(ValueError, match="x is on cpu"):
        L.lora_shrink(x.cpu(), lp.pool, lp.page_table, lp.ranks, slots)
    with pytest.raises(ValueError, match="lora_ranks has"):
        L.lora_shrink(x, lp.pool, lp.page_table, lp.ranks[:-1], slots)
    with pytest.raises(ValueError, match="y needs contiguous rows"):
        y = torch.randn(576, 8, device="cuda").to(torch.bfloat16).T
        L.lora_expand(y, torch.zeros(8, MAX_RANK, device="cuda"), lp.pool, lp.page_table,
                      lp.ranks, lp.scales, slots)
    with pytest.raises(ValueError, match="y has 4 tokens; x has 8"):
        L.lora_decode_onepass(torch.zeros(4, 576, device="cuda", dtype=torch.bfloat16), x,
                              lp.pool, lp.page_table, lp.ranks, lp.scales, slots)
    with pytest.raises(ValueError, match="lora_scales must be float32"):
        L.lora_decode_onepass(torch.zeros_like(x), x, lp.pool, lp.page_table, lp.ranks,
                              lp.scales.half(), slots)
    with pytest.raises(ValueError, match="parts must be a positive int, got 0"):
        L.lora_decode_onepass(torch.zeros_like(x), x, lp.pool, lp.page_table, lp.ranks,
                              lp.scales, slots, parts=0)
    q = torch.randn(2, 9, 64, device="cuda").to(torch.bfloat16)
    table = torch.zeros(2, 4, dtype=torch.int32, device="cuda")
    lens = torch.ones(2, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="num_kv_heads"):
        L.paged_attention_decode(q, lp.pool, table, lens, 4, 0.125)
