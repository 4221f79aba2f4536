"""The profiling mode of the tensor-parallel worker group: how long each collective takes,
per step kind, against the step's own time (DESIGN.md, Tensor parallelism).

Off by default; `SLORA_TP_PROFILE=PATH` in the worker's environment turns it on in rank 0
(TensorParallelGroup reads it once; when off, a collective costs one `is None` test more).
While on, the worker runs every step eagerly (a CUDA graph's replay hides its collectives
from Python) and times each collective that TensorParallelComm runs: with a pair of CUDA
events on a GPU, with perf_counter on the CPU (gloo's collectives return when done). Each
step's forward pass is timed the same way. Per step kind (prefill: every request a prompt
chunk; decode: every request one token; mixed) it keeps the steps, their forward time, and
per collective kind ("base": the base's all-reduces; "lora": the LoRA all-gathers and
all-reduces; "embed", "lm_head") the calls, the bytes one rank sends (an all-gather
(N-1)/N of its output, a ring all-reduce 2 (N-1)/N of its input) and their time. Rank 0
rewrites PATH as JSON (`summary`) every WRITE_EVERY steps and when the group closes.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import torch

ENV = "SLORA_TP_PROFILE"
WRITE_EVERY = 50
"""Steps between two writes of the summary file."""


def step_kind(num_new_tokens: list[int]) -> str:
    """prefill, decode or mixed, from the new tokens of each request of a step."""
    decode = sum(n == 1 for n in num_new_tokens)
    return "decode" if decode == len(num_new_tokens) else "prefill" if decode == 0 else "mixed"


class _Timer:
    """Times one span: CUDA events on a GPU (read at the step's end), perf_counter on the
    CPU."""

    __slots__ = ("cuda", "start", "end")

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start, self.end = time.perf_counter(), None

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.end = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.end - self.start


class CollectiveProfile:
    """What the collectives of each step kind took (see the module docstring)."""

    def __init__(self, device: torch.device, size: int, path: str | None = None):
        self.cuda = device.type == "cuda"
        self.size, self.path = size, path
        self.steps: dict[str, dict] = defaultdict(
            lambda: {"steps": 0, "forward_s": 0.0, "collectives": defaultdict(
                lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})})
        self._kind: str | None = None
        self._step: _Timer | None = None
        self._pending: list[tuple[str, int, _Timer]] = []
        self._since_write = 0

    @classmethod
    def from_env(cls, device: torch.device, size: int) -> "CollectiveProfile | None":
        path = os.environ.get(ENV)
        return cls(device, size, path) if path else None

    def begin_step(self, kind: str) -> None:
        self._kind, self._step, self._pending = kind, _Timer(self.cuda), []

    def begin(self) -> _Timer:
        return _Timer(self.cuda)

    def end(self, timer: _Timer, kind: str, nbytes: int) -> None:
        timer.stop()
        self._pending.append((kind, nbytes, timer))

    def end_step(self) -> None:
        """Adds the step's times (waits for its events on a GPU)."""
        if self._step is None:
            return
        self._step.stop()
        entry = self.steps[self._kind]
        entry["steps"] += 1
        entry["forward_s"] += self._step.seconds()
        for kind, nbytes, timer in self._pending:
            c = entry["collectives"][kind]
            c["calls"] += 1
            c["bytes"] += nbytes
            c["seconds"] += timer.seconds()
        self._step, self._pending = None, []
        self._since_write += 1
        if self.path and self._since_write >= WRITE_EVERY:
            self.write()

    def summary(self) -> dict:
        """{step kind: {steps, forward_s, collectives: {kind: {calls, bytes, seconds}},
        lora_share, base_share}}: the shares are of the forward passes' time."""
        out = {}
        for kind, e in self.steps.items():
            coll = {k: dict(v) for k, v in e["collectives"].items()}
            fwd = e["forward_s"]
            out[kind] = {"steps": e["steps"], "forward_s": fwd, "collectives": coll,
                         **{f"{k}_share": (coll.get(k, {}).get("seconds", 0.0) / fwd
                                           if fwd else 0.0) for k in ("lora", "base")}}
        return {"tensor_parallel_size": self.size, "timer": "cuda-events" if self.cuda
                else "perf_counter", "step_kinds": out}

    def write(self) -> None:
        self._since_write = 0
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary(), f, indent=1)
        os.replace(tmp, self.path)
