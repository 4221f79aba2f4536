"""The backend interface of the model's LoRA, attention and per-layer steps, and the batch
types it takes. Two implementations: TorchBackend (kernels/torch_backend.py: the torch
reference, any device) and CudaBackend (kernels/cuda_backend.py: the CuPy CUDA kernels).

Token order in a step's batch, which the worker guarantees and the kernels rely on:
the decode tokens first (one per request, `num_decode_tokens` of them, MBGMV / decode
attention), then the prefill tokens, contiguous per request (MBGMM / prefill attention).

`pool` below is always one layer of the unified pool, [num_pages, 2, H] (torch_ref.py has
the page layout); `pages` is the whole pool, [num_layers, num_pages, 2, H].
"""
from __future__ import annotations

import abc
import types
from dataclasses import dataclass

import torch

NO_WINDOW = 0
"""`sliding_window` of a model whose attention sees the whole context."""


@dataclass
class LoraBatch:
    """Which adapter each token of a step uses. Built once per step by the worker."""

    token_slots: torch.Tensor
    """[num_tokens] int32: adapter slot of each token, NO_ADAPTER (-1) for none."""
    num_decode_tokens: int
    """Tokens [0, num_decode_tokens) are decode tokens, one per request."""
    seg_starts: torch.Tensor
    """[num_segments + 1] int32: prefill segments (one adapter each) as token offsets."""
    seg_slots: torch.Tensor
    """[num_segments] int32: the adapter slot of each prefill segment."""
    any_lora: bool
    """False when no token uses an adapter: the LoRA path is skipped."""
    modules: frozenset[str] | None = None
    """The projections some token's adapter targets (the others skip LoRA); None: all of
    them, as a CUDA graph captures it."""


@dataclass(frozen=True)
class LoraTables:
    """Where the resident adapters' rows are, for every LoRA module at once: module m's
    tables are `page_table[m]`, `ranks[m]`, `scales[m]` (m: the module's index in the
    model's LoRA target list). The worker's pool owns one for its lifetime and updates the
    tensors in place as adapters come and go, so a captured CUDA graph reads the current
    tables.

    Shapes (all on the pool's device, contiguous):
    * page_table [num_modules, num_slots, max_rank, max_pages_per_row] int32: the pages of
      rank-row i of module m of the adapter in slot s (a row longer than the page width H
      spans several pages); rows past that adapter's rank for m are never read.
    * ranks [num_modules, num_slots] int32: module m's rank in slot s, 0 where the adapter
      does not target m or the slot is empty.
    * scales [num_modules, num_slots] float32: module m's scaling in slot s (lora_alpha / r,
      or lora_alpha / sqrt(r) with rsLoRA).
    """

    page_table: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self):
        checks = (("page_table", self.page_table, 4, torch.int32),
                  ("ranks", self.ranks, 2, torch.int32),
                  ("scales", self.scales, 2, torch.float32))
        for name, t, ndim, dtype in checks:
            if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype != dtype:
                raise ValueError(f"LoraTables.{name} must be a {ndim}-D {dtype} tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
            if t.device != self.page_table.device:
                raise ValueError(f"LoraTables.{name} is on {t.device}; page_table is on "
                                 f"{self.page_table.device}")
        for name, t in (("ranks", self.ranks), ("scales", self.scales)):
            if tuple(t.shape) != tuple(self.page_table.shape[:2]):
                raise ValueError(f"LoraTables.{name} has shape {tuple(t.shape)}; page_table "
                                 f"needs [num_modules, num_slots] = "
                                 f"{list(self.page_table.shape[:2])}")

    @property
    def num_modules(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_slots(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_rank(self) -> int:
        return self.page_table.shape[2]

    @property
    def max_pages_per_row(self) -> int:
        return self.page_table.shape[3]

    def module(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Module m's (page_table [num_slots, max_rank, max_pages_per_row], ranks
        [num_slots], scales [num_slots]): the single-module launchers' arguments."""
        return self.page_table[m], self.ranks[m], self.scales[m]


@dataclass(frozen=True)
class LoraGroup:
    """Projections that read the same input and write columns of one output (q, k and v
    into the fused qkv projection's output; gate and up): their LoRA runs as one group."""

    members: tuple[tuple[int, int, int], ...]
    """(module index, first column, width) of each member."""
    table: torch.Tensor
    """[num_members, 3] int32 on the device: `members`, for the kernels."""

    @property
    def max_d_out(self) -> int:
        return max(width for _, _, width in self.members)


@dataclass
class AttentionBatch:
    """Where each request's context lives. Built once per step by the worker."""

    kv_page_table: torch.Tensor
    """[num_reqs, max_pages] int32: page of each context position."""
    context_lens: torch.Tensor
    """[num_reqs] int32: context length after this step's tokens."""
    query_start_loc: torch.Tensor
    """[num_reqs + 1] int32: each request's new tokens in the batch."""
    token_page_ids: torch.Tensor
    """[num_tokens] int32: the page each new token's K/V is written to."""
    num_decode_reqs: int
    """Requests [0, num_decode_reqs) have one new token each (and come first)."""
    max_query_len: int
    max_context_len: int


class Backend(abc.ABC):
    """What the model layer calls for the LoRA of a projection group, attention over pages
    and the small steps between a layer's GEMMs. Implementations give the same results to
    the rounding of their sums (tests/gpu compares them); none synchronises with the host
    on a decode-only batch, so a decode step can be captured in a CUDA graph.

    The per-layer steps go straight to `ops`, a module of functions with torch_ref's
    signatures (torch_ref itself, or the CUDA launchers); LoRA and attention, which route a
    batch's decode and prefill parts, each implementation writes itself."""

    name: str
    """"torch" or "cuda"."""
    ops: types.ModuleType
    """torch_ref, or kernels/launchers/: the same functions, the same argument names."""

    @abc.abstractmethod
    def lora_group(self, y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor,
                   tables: LoraTables, group: LoraGroup, batch: LoraBatch, *,
                   after_base_gemm: bool = False) -> torch.Tensor:
        """y[:, col:col + width] += each member's LoRA of x per token's adapter, in place;
        returns y. x [num_tokens, d_in], y [num_tokens, width of the fused output], both in
        the pool's dtype. after_base_gemm: the last kernel on the stream is the GEMM that
        made y from x, so a backend may start behind it before it ends (it writes neither
        x, the tables nor the pool)."""

    @abc.abstractmethod
    def lora_shrink(self, x: torch.Tensor, pool: torch.Tensor, tables: LoraTables,
                    module: int, batch: LoraBatch) -> torch.Tensor:
        """The first half of one module's LoRA alone (tensor parallelism runs a collective
        between the halves): v [num_tokens, tables.max_rank] float32, v[t, i] = x[t] @ A[i]
        of token t's adapter for i below its rank, 0 elsewhere. x [num_tokens, d_in]."""

    @abc.abstractmethod
    def lora_expand(self, y: torch.Tensor, v: torch.Tensor, pool: torch.Tensor,
                    tables: LoraTables, module: int, batch: LoraBatch) -> torch.Tensor:
        """The second half: y[t] += scale * v[t, :r] @ B^T of token t's adapter, in place;
        returns y. y [num_tokens, d_out] (may be a column slice); v as lora_shrink gives."""

    @abc.abstractmethod
    def paged_attention(self, q: torch.Tensor, pool: torch.Tensor, batch: AttentionBatch,
                        num_kv_heads: int, scale: float, *,
                        sliding_window: int) -> torch.Tensor:
        """Causal attention of the batch's new tokens over their contexts (their K/V
        already stored): q [num_tokens, num_heads, head_dim] -> the same shape. With
        sliding_window = W > 0 a query at position p sees the keys at positions
        p - W < j <= p (Hugging Face Mistral's window, W keys counting its own);
        NO_WINDOW (0) sees all of [0, p]."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor,
                 batch: AttentionBatch) -> None:
        """k, v [num_tokens, kv_dim] into the first kv_dim elements of each new token's
        page halves (batch.token_page_ids)."""
        self.ops.store_kv(k, v, pool, batch.token_page_ids)

    def write_adapter_rows(self, pages: torch.Tensor, rows: torch.Tensor,
                           page_ids: torch.Tensor, half: int) -> None:
        """One module's A rows (half 0) or B^T rows (half 1) at every layer into their
        pages, zero-padded: rows [num_layers, r, width], page_ids [r, n] int64."""
        self.ops.write_adapter_rows(pages, rows, page_ids, half)

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """h += delta in place (the residual stream; None: no add), then returns
        weight * RMSNorm(h). h, delta [num_tokens, hidden]; weight [hidden]."""
        return self.ops.add_rms_norm(h, delta, weight, eps)

    def rope_store_kv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin_signed: torch.Tensor, pool: torch.Tensor, batch: AttentionBatch,
                      num_heads: int, num_kv_heads: int, *, q_norm: torch.Tensor | None = None,
                      k_norm: torch.Tensor | None = None,
                      norm_eps: float = 1e-6) -> torch.Tensor:
        """Rotary q and k of the fused projection's output qkv [num_tokens, (num_heads + 2
        num_kv_heads) * head_dim], the rotated k and the v stored into the new tokens'
        pages; returns q [num_tokens, num_heads, head_dim]. q_norm, k_norm [head_dim]
        (Qwen3; both or neither): each q and k head RMS-normed with that weight first."""
        return self.ops.rope_store_kv(qkv, positions, cos, sin_signed, pool,
                                      batch.token_page_ids, num_heads, num_kv_heads,
                                      q_norm=q_norm, k_norm=k_norm, norm_eps=norm_eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the fused gate/up output [num_tokens, 2 * inter]."""
        return self.ops.silu_mul(gate_up)


def get_backend(device: torch.device | str, prefer: str = "auto") -> Backend:
    """CuPy kernels on CUDA when CuPy is importable (or `prefer="cuda"`), torch otherwise."""
    from slora.kernels.torch_backend import TorchBackend
    device = torch.device(device)
    if prefer == "torch" or device.type != "cuda":
        return TorchBackend()
    try:
        from slora.kernels.cuda_backend import CudaBackend
    except ImportError:
        if prefer == "cuda":
            raise
        return TorchBackend()
    return CudaBackend()
