"""A step's batch as device tensors, built with O(batch + new tokens) host work.

Who owns each form of the batch: the scheduler plans it and sends a StepCommand (request ids,
new page ids, adapter slots; protos/step.py); the executor keeps each request's state
(`RequestState`: its tokens, progress, adapter slot and page-table row); this module turns
the scheduled requests into the tensors of kernels/backend.py, in the kernels' order
(decode requests first, then prefill chunks).

**Persistent per-request device state.** `kv_page_table` [max_num_seqs + 1, max_model_len]
int32 lives on the device for the worker's lifetime: each running request owns a row (given
when it arrives, taken back when it finishes), and position p of its context is in page
kv_page_table[row, p]. A step writes only its new tokens' page ids into the table (from
`kv_flat_index`, row * max_model_len + position, inside the step itself), and attention reads
the batch's rows through `req_rows`; no step rebuilds a request's page list on the host. The
last row, `scratch_row`, and the pool's scratch page serve the padding rows of a CUDA-graph
batch.

**One copy per step.** Every integer of a step goes into one pinned host buffer at fixed
offsets (a field per token or per request, sized for the largest padded graph step), then
one host-to-device copy into a device buffer of the same layout; the batch's tensors are
views of it. Fixed offsets give CUDA graphs static input addresses (worker/cuda_graphs.py). Two host
buffers take turns, each guarded by an event, so filling step N+1 never overwrites what step
N's copy has not read yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slora.common.sampling_params import SamplingParams
from slora.kernels.backend import AttentionBatch, LoraBatch
from slora.protos.step import NO_ADAPTER_SLOT
from slora.models.decoder import ForwardBatch

PAD_TOKEN_ID = 0


@dataclass
class RequestState:
    """What the worker keeps of a running request between steps."""

    req_id: str
    token_ids: list[int]
    """The prompt, then every sampled token."""
    num_prompt_tokens: int
    num_computed_tokens: int
    """Tokens whose K/V are in the pool: positions [0, num_computed_tokens)."""
    adapter_slot: int
    sampling: SamplingParams
    row: int
    """Its row of StepInputs.kv_page_table."""


@dataclass
class ScheduledRequest:
    state: RequestState
    num_new: int
    """Tokens computed this step, from position state.num_computed_tokens."""
    page_ids: list[int]
    """The pages of those tokens, one each, in position order."""


@dataclass
class StepBatch:
    """The host's view of a built step: sizes, and what to do with the logits."""

    num_tokens: int
    num_reqs: int
    num_decode: int
    """Requests [0, num_decode) have one new token each."""
    num_segs: int
    """Prefill segments (one per request past the decode ones)."""
    max_query_len: int
    max_context_len: int
    any_lora: bool
    sampled: list[RequestState]
    """Requests that sample a token, in the order of logits_indices."""
    graph_size: int | tuple[int, int]
    """The CUDA-graph bucket this step replays: a decode batch size, or a mixed graph's
    (decode rows, prefill rows); 0: eager."""
    graph_kind: str = ""
    """"decode" or "mixed"; "" when eager."""


_FIELDS_PER_TOKEN = ("input_ids", "positions", "token_page_ids", "token_slots", "kv_flat_index")
_FIELDS_PER_REQUEST = ("context_lens", "req_rows", "logits_indices", "seg_slots")
_FIELDS_PER_REQUEST_PLUS_ONE = ("query_start_loc", "seg_starts")


class StepInputs:
    """The persistent page table and the step's input buffers (see the module docstring)."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 scratch_page: int, device: torch.device):
        self.device = device
        self.row_width = max_model_len
        self.scratch_row = max_num_seqs
        self.scratch_page = scratch_page
        # Every entry always names a real page: a padding row may read any of them.
        self.kv_page_table = torch.full((max_num_seqs + 1, max_model_len), scratch_page,
                                        dtype=torch.int32, device=device)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.max_step_tokens = max_num_batched_tokens
        self.max_num_reqs = max_num_seqs
        # Room for a mixed graph's padding: up to max_num_seqs decode rows before the prefill
        # tokens, and as many prefill requests after the decode requests.
        self.max_num_tokens = max_num_batched_tokens + max_num_seqs
        self.max_rows = 2 * max_num_seqs
        sizes = {**{f: self.max_num_tokens for f in _FIELDS_PER_TOKEN},
                 **{f: self.max_rows for f in _FIELDS_PER_REQUEST},
                 **{f: self.max_rows + 1 for f in _FIELDS_PER_REQUEST_PLUS_ONE}}
        self.offsets: dict[str, int] = {}
        size = 0
        for name, n in sizes.items():
            self.offsets[name] = size
            size += -(-n // 4) * 4  # 16-byte aligned fields
        cuda = device.type == "cuda"
        self._host = [torch.zeros(size, dtype=torch.int32, pin_memory=cuda)
                      for _ in range(2 if cuda else 1)]
        self._host_np = [h.numpy() for h in self._host]
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._host)
        self._turn = 0
        self._dev = torch.zeros(size, dtype=torch.int32, device=device) if cuda else self._host[0]

    # -- rows -----------------------------------------------------------------------------

    def assign_row(self) -> int:
        assert self._free_rows, (
            f"more than max_num_seqs={self.max_num_reqs} requests held at once")
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def free_all_rows(self) -> None:
        self._free_rows = list(range(self.max_num_reqs - 1, -1, -1))

    # -- building a step ------------------------------------------------------------------

    def _host_buffer(self) -> np.ndarray:
        """The host buffer whose turn it is, once its last copy has been read."""
        self._turn = (self._turn + 1) % len(self._host)
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        return self._host_np[self._turn]

    def _upload(self) -> None:
        if self._dev is self._host[self._turn]:
            return
        self._dev.copy_(self._host[self._turn], non_blocking=True)
        event = self._copied[self._turn] or torch.cuda.Event()
        event.record()
        self._copied[self._turn] = event

    def build(self, scheduled: list[ScheduledRequest], graphs=None) -> StepBatch:
        """Fills the step's inputs from `scheduled` (decode requests first) and copies them
        to the device. With `graphs` (worker/cuda_graphs.py StepGraphs) a step that fits a
        bucket is padded to it: a decode-only batch to `graphs.bucket(n)` requests; any other
        step to a mixed shape (D, S): its decode tokens padded to D rows (decode attention,
        MBGMV), then its prefill tokens from row D padded to S rows, its prefill requests
        (one LoRA segment each) padded to `graphs.mixed_prefill_reqs(S)`."""
        h, o, width = self._host_buffer(), self.offsets, self.row_width
        num_reqs = len(scheduled)
        assert num_reqs <= self.max_num_reqs, f"{num_reqs} requests in one step"
        nd = 0
        while nd < num_reqs and scheduled[nd].num_new == 1:
            nd += 1
        num_prefill = sum(s.num_new for s in scheduled[nd:])
        num_tokens = nd + num_prefill
        assert num_tokens <= self.max_step_tokens, (
            f"{num_tokens} tokens in one step; at most {self.max_step_tokens}")
        graph_kind, graph_size = "", 0
        if graphs is not None:
            if nd == num_reqs:
                graph_kind, graph_size = "decode", graphs.bucket(nd)
            else:
                graph_kind, graph_size = "mixed", graphs.mixed_bucket(nd, num_prefill)
            if not graph_size:
                graph_kind, graph_size = "", 0
        mixed = graph_kind == "mixed"
        # The prefill tokens and requests start at row `first`: nd, or D in a mixed graph.
        first = graph_size[0] if mixed else nd
        sampled: list[RequestState] = []
        logits_indices: list[int] = []
        any_lora = False
        max_context_len = 0
        max_query_len = 1
        if nd:
            states = [s.state for s in scheduled[:nd]]
            pos = np.array([st.num_computed_tokens for st in states], dtype=np.int32)
            rows = np.array([st.row for st in states], dtype=np.int32)
            slots = [st.adapter_slot for st in states]
            h[o["input_ids"]:o["input_ids"] + nd] = [
                st.token_ids[st.num_computed_tokens] for st in states]
            h[o["positions"]:o["positions"] + nd] = pos
            h[o["token_page_ids"]:o["token_page_ids"] + nd] = [s.page_ids[0]
                                                               for s in scheduled[:nd]]
            h[o["token_slots"]:o["token_slots"] + nd] = slots
            h[o["kv_flat_index"]:o["kv_flat_index"] + nd] = rows * width + pos
            h[o["context_lens"]:o["context_lens"] + nd] = pos + 1
            h[o["req_rows"]:o["req_rows"] + nd] = rows
            h[o["query_start_loc"]:o["query_start_loc"] + nd + 1] = np.arange(nd + 1)
            for i, st in enumerate(states):
                if st.num_computed_tokens + 1 == len(st.token_ids):
                    logits_indices.append(i)
                    sampled.append(st)
            any_lora = any(slot != NO_ADAPTER_SLOT for slot in slots)
            max_context_len = int(pos.max()) + 1
        if first > nd:  # a mixed graph's decode rows past the step's
            self._pad_tokens(h, nd, first)
            self._pad_decode_requests(h, nd, first)

        b = first
        for j, s in enumerate(scheduled[nd:]):
            st, n, i = s.state, s.num_new, first + j
            assert n > 1, "a request with one new token is a decode request"
            start, end = st.num_computed_tokens, st.num_computed_tokens + n
            a, b = b, b + n
            positions = np.arange(start, end, dtype=np.int32)
            h[o["input_ids"] + a:o["input_ids"] + b] = st.token_ids[start:end]
            h[o["positions"] + a:o["positions"] + b] = positions
            h[o["token_page_ids"] + a:o["token_page_ids"] + b] = s.page_ids
            h[o["token_slots"] + a:o["token_slots"] + b] = st.adapter_slot
            h[o["kv_flat_index"] + a:o["kv_flat_index"] + b] = st.row * width + positions
            h[o["context_lens"] + i] = end
            h[o["req_rows"] + i] = st.row
            h[o["query_start_loc"] + i + 1] = b
            h[o["seg_starts"] + j] = a
            h[o["seg_slots"] + j] = st.adapter_slot
            if end == len(st.token_ids):
                logits_indices.append(b - 1)
                sampled.append(st)
            any_lora = any_lora or st.adapter_slot != NO_ADAPTER_SLOT
            max_context_len = max(max_context_len, end)
            max_query_len = max(max_query_len, n)
        num_segs = num_reqs - nd
        h[o["query_start_loc"]] = 0
        h[o["seg_starts"] + num_segs] = b
        h[o["logits_indices"]:o["logits_indices"] + len(logits_indices)] = logits_indices

        if graph_kind == "decode":
            self._pad_tokens(h, nd, graph_size)
            self._pad_decode_requests(h, nd, graph_size)
        elif mixed:
            d, s = graph_size
            self._pad_tokens(h, b, d + s)
            self._pad_requests(h, first + num_segs, first + graphs.mixed_prefill_reqs(s), b,
                               seg_offset=first)
            li = o["logits_indices"]
            h[li + len(logits_indices):li + self.max_num_reqs] = 0
        self._upload()
        return StepBatch(num_tokens, num_reqs, nd, num_segs, max_query_len, max_context_len,
                         any_lora, sampled, graph_size, graph_kind)

    def _pad_tokens(self, h: np.ndarray, start: int, end: int) -> None:
        """Tokens [start, end) as padding: token 0 at position 0, no adapter, K/V to the
        scratch page (through the scratch row)."""
        o = self.offsets
        for name, value in (("input_ids", PAD_TOKEN_ID), ("positions", 0),
                            ("token_page_ids", self.scratch_page),
                            ("token_slots", NO_ADAPTER_SLOT),
                            ("kv_flat_index", self.scratch_row * self.row_width)):
            h[o[name] + start:o[name] + end] = value

    def _pad_decode_requests(self, h: np.ndarray, start: int, end: int) -> None:
        """Decode rows [start, end) as padding: the scratch row with a context of one
        token (their tokens padded by _pad_tokens)."""
        o = self.offsets
        h[o["context_lens"] + start:o["context_lens"] + end] = 1
        h[o["req_rows"] + start:o["req_rows"] + end] = self.scratch_row
        qsl = o["query_start_loc"]
        h[qsl + start + 1:qsl + end + 1] = np.arange(start + 1, end + 1)

    def _pad_requests(self, h: np.ndarray, start: int, end: int, token: int,
                      seg_offset: int = 0) -> None:
        """Prefill requests [start, end) as padding of a mixed graph: no tokens (they start
        and end at row `token`), the scratch row; their LoRA segments (request i is segment
        i - seg_offset) empty, no adapter."""
        o = self.offsets
        h[o["context_lens"] + start:o["context_lens"] + end] = 1
        h[o["req_rows"] + start:o["req_rows"] + end] = self.scratch_row
        h[o["query_start_loc"] + start + 1:o["query_start_loc"] + end + 1] = token
        s0, s1 = start - seg_offset, end - seg_offset
        h[o["seg_starts"] + s0 + 1:o["seg_starts"] + s1 + 1] = token
        h[o["seg_slots"] + s0:o["seg_slots"] + s1] = NO_ADAPTER_SLOT

    def write_padding(self) -> None:
        """Makes every token and request of the device inputs padding (before a graph
        capture: whatever shape it captures, it touches no request's pages)."""
        h = self._host_buffer()
        o = self.offsets
        self._pad_tokens(h, 0, self.max_num_tokens)
        self._pad_requests(h, 0, self.max_rows, 0)
        h[o["query_start_loc"]] = h[o["seg_starts"]] = 0
        h[o["logits_indices"]:o["logits_indices"] + self.max_num_reqs] = 0
        self._upload()

    # -- device views ---------------------------------------------------------------------

    def _view(self, name: str, n: int) -> torch.Tensor:
        return self._dev[self.offsets[name]:self.offsets[name] + n]

    def logits_indices(self, num_sampled: int) -> torch.Tensor:
        return self._view("logits_indices", num_sampled)

    def forward_batch(self, num_tokens: int, num_reqs: int, num_decode: int, num_segs: int,
                      max_query_len: int, max_context_len: int, any_lora: bool,
                      num_sampled: int | None,
                      lora_modules: frozenset[str] | None = None) -> ForwardBatch:
        """Writes the step's new page ids into kv_page_table, then returns the forward
        pass's batch as views of the device inputs (num_sampled None: logits of every
        token). Queues device work only, so a CUDA graph captures it."""
        token_page_ids = self._view("token_page_ids", num_tokens)
        self.kv_page_table.view(-1)[self._view("kv_flat_index", num_tokens)] = token_page_ids
        attn = AttentionBatch(
            kv_page_table=self.kv_page_table.index_select(0, self._view("req_rows", num_reqs)),
            context_lens=self._view("context_lens", num_reqs),
            query_start_loc=self._view("query_start_loc", num_reqs + 1),
            token_page_ids=token_page_ids, num_decode_reqs=num_decode,
            max_query_len=max_query_len, max_context_len=max_context_len)
        lora = LoraBatch(
            token_slots=self._view("token_slots", num_tokens), num_decode_tokens=num_decode,
            seg_starts=self._view("seg_starts", num_segs + 1),
            seg_slots=self._view("seg_slots", num_segs), any_lora=any_lora,
            modules=lora_modules)
        return ForwardBatch(
            self._view("input_ids", num_tokens), self._view("positions", num_tokens), attn,
            lora, None if num_sampled is None else self.logits_indices(num_sampled))
