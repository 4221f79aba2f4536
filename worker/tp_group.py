"""The tensor-parallel worker group: N processes, one per GPU, one torch.distributed group.

Owner: worker/. Rank 0 is the worker the scheduler talks to (worker/server.py, or the
in-process Engine); it starts ranks 1..N-1 itself (`launch`), as `python -m
slora.worker.tp_rank` children that read their spec on stdin, build their shard of the
worker (executor.py) and follow rank 0 (tp_rank.py). Three process groups:
* the default one (gloo): rendezvous and the start-up barrier, with a long timeout, since
  ranks load their weights at their own pace. The rendezvous is a torch FileStore in a
  directory only this user can open (mkdtemp, mode 0700), named to the followers on their
  stdin: another local user can neither join the group (and read the step commands, the
  users' prompts) nor spoil its start, as they could through a TCP store on a loopback port;
* `control` (gloo, on the CPU even beside GPUs): rank 0 broadcasts each message to the
  other ranks: a step command as its protobuf bytes, plus the tokens rank 0 sampled in the
  step before (only rank 0 samples; the others need them as the next decode inputs). One
  broadcast of a fixed CONTROL_BYTES buffer, a second only for a longer message (prompts).
  The followers wait here between steps, without a timeout of consequence;
* `data` (NCCL on GPUs, gloo on the CPU): the model's collectives (TensorParallelComm), each
  with the collective timeout.

Failure. A collective that fails (a peer's socket closed: it died) or waits past the timeout
(a peer hangs) raises TensorParallelGroupError; rank 0 also watches its children and calls
`on_rank_exit` the moment one exits. The group is then down as a whole: rank 0's owner
(worker/server.py) kills the other ranks and exits, the scheduler ends the requests in flight
with UNAVAILABLE, and the launcher starts the group afresh. Followers die with rank 0
(PR_SET_PDEATHSIG) or at their next collective. While idle, rank 0 pings (`ping`: a
broadcast, then a one-value all-reduce over `data`), so a hung rank is found within the
ping interval plus the collective timeout even when no step runs.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import signal
import struct
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from slora.common.errors import ConfigError, TensorParallelGroupError
from slora.common.lifecycle import python_module_command
from slora.worker.tp_profile import CollectiveProfile

log = logging.getLogger("slora.worker.tp")

CONTROL_BYTES = 16 << 10
"""Bytes of the one broadcast a message normally takes; longer ones take a second."""
JOINED_KEY = "slora/joined"
JOIN_POLL_S = 0.05
STARTUP_TIMEOUT_S = 600.0
"""Rendezvous and start-up barrier: ranks import torch and load their shards meanwhile."""
IDLE_TIMEOUT = timedelta(days=7)
"""How long a follower waits for rank 0's next message (rank 0's death is seen at once)."""
DEFAULT_COLLECTIVE_TIMEOUT_S = 20.0
PING_INTERVAL_S = 2.0
"""Rank 0 pings after this long without a message (worker/server.py)."""
STOP_WAIT_S = 10.0

STEP, RESET, PING, STOP = 1, 2, 3, 4
"""Message kinds."""
_HEADER = struct.Struct("<IIII")
"""kind, flags, payload bytes, sampled tokens."""
EAGER = 1
"""Flag of a STEP: run it eagerly (rank 0's use_cuda_graphs is off): every rank must run a
step as the same graph, or eagerly, for their collectives to match."""


@dataclass
class RankSpec:
    """What a follower needs to join the group and build its shard (JSON on its stdin)."""

    rank: int
    world_size: int
    store_path: str
    """Rank 0's FileStore (in its private directory): the group's rendezvous."""
    model_info: str
    """The worker's EngineConfig as protos/model_info.py's ModelInfo, serialized, base64."""
    model_path: str | None
    backend: str
    cuda_graphs: bool
    collective_timeout_s: float
    parent_pid: int
    memory_sizing: list | None = None
    """Rank 0's MemorySizing as [gpu_memory_utilization, size_batch], when the group sizes
    its pool and batch from measured memory (worker/memory_plan.py); the ModelInfo carries
    only what was chosen."""


def _file_store(path: str, size: int):
    store = dist.FileStore(path, size)
    store.set_timeout(timedelta(seconds=STARTUP_TIMEOUT_S))
    return store


def rank_device(device: str, rank: int) -> torch.device:
    """Rank's device: cuda:(k + rank) for a group on cuda:k; the CPU for all on the CPU."""
    d = torch.device(device)
    if d.type != "cuda":
        return d
    return torch.device("cuda", (d.index or 0) + rank)


def _check_no_group() -> None:
    if dist.is_initialized():
        raise TensorParallelGroupError(
            "this process already belongs to a torch.distributed group: close the other "
            "tensor-parallel worker first")


def _wait_joined(store, children: list[subprocess.Popen]) -> None:
    """Rank 0: waits until every follower has reached the store; one that exits first (a
    missing GPU, a broken install) fails the start at once instead of after the timeout."""
    keys = [f"{JOINED_KEY}/{rank}" for rank in range(1, len(children) + 1)]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not store.check(keys):
        for rank, child in enumerate(children, start=1):
            if child.poll() is not None:
                raise TensorParallelGroupError(f"tensor-parallel rank {rank} exited with code "
                                               f"{child.returncode} before joining the group")
        if time.monotonic() > deadline:
            raise TensorParallelGroupError(f"tensor-parallel ranks did not join within "
                                           f"{STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(JOIN_POLL_S)


def _init_default_group(store, rank: int, size: int) -> None:
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size,
                            timeout=timedelta(seconds=STARTUP_TIMEOUT_S))


def check_devices(device: str, size: int) -> None:
    """ConfigError unless the GPUs the group's ranks would use exist."""
    d = torch.device(device)
    if d.type != "cuda":
        return
    first, count = d.index or 0, torch.cuda.device_count()
    if first + size > count:
        raise ConfigError(f"tensor parallel size {size} on {device} needs GPUs cuda:{first} to "
                          f"cuda:{first + size - 1}; this machine has {count}")


class TensorParallelComm:
    """The model's collectives over the `data` group. Counts what each kind of collective
    moves per rank (`elements[kind]`; eager calls only, a graph replay counts nothing): an
    all-gather sends (N-1)/N of its output, a ring all-reduce 2 (N-1)/N of its input."""

    def __init__(self, group, rank: int, size: int, nccl: bool):
        self.group, self.rank, self.size, self._nccl = group, rank, size, nccl
        self.elements: Counter[str] = Counter()
        self.profile = None
        """A CollectiveProfile (worker/tp_profile.py) while profiling, else None."""

    def all_reduce(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """Sums t over the ranks, in place; returns t."""
        sent = 2 * (self.size - 1) * t.numel() // self.size
        self.elements[kind] += sent
        if self.profile is not None:
            timer = self.profile.begin()
            self._all_reduce(t)
            self.profile.end(timer, kind, sent * t.element_size())
            return t
        return self._all_reduce(t)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        try:
            dist.all_reduce(t, group=self.group)
        except RuntimeError as e:
            raise TensorParallelGroupError(f"tensor-parallel all-reduce failed: {e}") from e
        return t

    def all_gather(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """[N, *t.shape]: every rank's t, by rank."""
        sent = (self.size - 1) * t.numel()
        self.elements[kind] += sent
        if self.profile is not None:
            timer = self.profile.begin()
            out = self._all_gather(t)
            self.profile.end(timer, kind, sent * t.element_size())
            return out
        return self._all_gather(t)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        try:
            if self._nccl:
                out = torch.empty((self.size, *t.shape), dtype=t.dtype, device=t.device)
                dist.all_gather_into_tensor(out, t, group=self.group)
                return out
            parts = [torch.empty_like(t) for _ in range(self.size)]
            dist.all_gather(parts, t, group=self.group)
        except RuntimeError as e:
            raise TensorParallelGroupError(f"tensor-parallel all-gather failed: {e}") from e
        return torch.stack(parts)


class TensorParallelGroup:
    """This process's membership of the group (see the module docstring)."""

    rank_command: tuple[str, ...] = ("slora.worker.tp_rank",)
    """The module (and its arguments) rank 0 starts each follower with; the serving
    benchmark's worker names its own (bench/dummy_worker.py)."""

    def __init__(self, rank: int, size: int, device: torch.device,
                 collective_timeout_s: float, children: list[subprocess.Popen] | None = None,
                 rendezvous_dir: str | None = None):
        self.rank, self.size, self.device = rank, size, device
        self.children = children or []
        self.on_rank_exit = None
        """Rank 0: called (rank, exit code) from a watcher thread when a follower exits
        while the group is up."""
        self.rendezvous_dir = rendezvous_dir
        """Rank 0: the FileStore's private directory, removed when the group ends
        (`kill_children`; the store stays in use after start-up: NCCL's communicators form
        lazily, through it)."""
        self._closing = False
        nccl = device.type == "cuda"
        if nccl:
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=collective_timeout_s)
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        data = dist.new_group(backend="nccl" if nccl else "gloo", timeout=timeout)
        self.comm = TensorParallelComm(data, rank, size, nccl)
        if rank == 0:
            self.comm.profile = CollectiveProfile.from_env(device, size)
        self._buffer = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
        self._ping = torch.zeros(1, dtype=torch.float32, device=device)
        for i, child in enumerate(self.children, start=1):
            threading.Thread(target=self._watch, args=(i, child), daemon=True,
                             name=f"slora-tp-watch-{i}").start()

    # -- forming the group ----------------------------------------------------------------

    @classmethod
    def launch(cls, config, model_path: str | None, backend: str, cuda_graphs: bool,
               collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
               ) -> "TensorParallelGroup":
        """Rank 0: starts ranks 1..N-1 of `config` (an EngineConfig) and joins them."""
        from slora.protos.model_info import model_info_from_config

        size = config.tensor_parallel_size
        check_devices(config.device, size)
        _check_no_group()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        rendezvous = tempfile.mkdtemp(prefix="slora-tp-")  # mode 0700: this user's alone
        store_path = os.path.join(rendezvous, "store")
        store = _file_store(store_path, size)
        info = model_info_from_config(config, model_path).SerializeToString()
        children = []
        try:
            for rank in range(1, size):
                sizing = config.memory_sizing
                spec = RankSpec(rank, size, store_path, base64.b64encode(info).decode(),
                                model_path, backend, cuda_graphs, collective_timeout_s,
                                os.getpid(), None if sizing is None else
                                [sizing.gpu_memory_utilization, sizing.size_batch])
                child = subprocess.Popen(python_module_command(*cls.rank_command),
                                         stdin=subprocess.PIPE, text=True)
                child.stdin.write(json.dumps(spec.__dict__))
                child.stdin.close()
                children.append(child)
            _wait_joined(store, children)
            _init_default_group(store, 0, size)
            return cls(0, size, rank_device(config.device, 0), collective_timeout_s, children,
                       rendezvous)
        except BaseException:
            for child in children:
                child.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            shutil.rmtree(rendezvous, ignore_errors=True)
            raise

    @classmethod
    def join(cls, spec: RankSpec, device: str) -> "TensorParallelGroup":
        """A follower: joins rank 0's group."""
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = _file_store(spec.store_path, spec.world_size)
        store.set(f"{JOINED_KEY}/{spec.rank}", "1")
        _init_default_group(store, spec.rank, spec.world_size)
        return cls(spec.rank, spec.world_size, rank_device(device, spec.rank),
                   spec.collective_timeout_s)

    def wait_ready(self) -> None:
        """Returns once every rank has built its shard."""
        try:
            dist.barrier()
        except RuntimeError as e:
            raise TensorParallelGroupError(f"tensor-parallel start-up failed: {e}") from e

    # -- messages -------------------------------------------------------------------------

    def send(self, kind: int, payload: bytes = b"", tokens: list[int] = (),
             flags: int = 0) -> None:
        """Rank 0: one message to every other rank."""
        body = _HEADER.pack(kind, flags, len(payload), len(tokens)) + payload + struct.pack(
            f"<{len(tokens)}q", *tokens)
        head = body[:CONTROL_BYTES]
        self._buffer[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self._broadcast(self._buffer)
        if len(body) > CONTROL_BYTES:
            self._broadcast(torch.frombuffer(bytearray(body[CONTROL_BYTES:]), dtype=torch.uint8))

    def receive(self) -> tuple[int, int, bytes, list[int]]:
        """A follower: the next message (kind, flags, payload, tokens)."""
        self._broadcast(self._buffer)
        head = self._buffer.numpy().tobytes()
        kind, flags, num_bytes, num_tokens = _HEADER.unpack_from(head)
        size = _HEADER.size + num_bytes + 8 * num_tokens
        body = head[:size]
        if size > CONTROL_BYTES:
            rest = torch.empty(size - CONTROL_BYTES, dtype=torch.uint8)
            self._broadcast(rest)
            body = head + rest.numpy().tobytes()
        payload = body[_HEADER.size:_HEADER.size + num_bytes]
        tokens = list(struct.unpack_from(f"<{num_tokens}q", body, _HEADER.size + num_bytes))
        return kind, flags, payload, tokens

    def _broadcast(self, t: torch.Tensor) -> None:
        try:
            dist.broadcast(t, src=0, group=self.control)
        except RuntimeError as e:
            raise TensorParallelGroupError(
                f"tensor-parallel rank {self.rank}: control broadcast failed: {e}") from e

    def min_over_ranks(self, values: list[int]) -> list[int]:
        """Every rank at once: each value's least over the ranks (start-up agreement, on the
        control group: host tensors)."""
        t = torch.tensor(values, dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        except RuntimeError as e:
            raise TensorParallelGroupError(
                f"tensor-parallel rank {self.rank}: all-reduce of the start-up figures "
                f"failed: {e}") from e
        return t.tolist()

    def ping(self) -> None:
        """Every rank (rank 0 after sending PING): a one-value all-reduce that a hung or
        dead rank fails within the collective timeout."""
        self.comm.all_reduce(self._ping, "ping")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- ending ---------------------------------------------------------------------------

    def _watch(self, rank: int, child: subprocess.Popen) -> None:
        code = child.wait()
        if not self._closing and self.on_rank_exit is not None:
            self.on_rank_exit(rank, code)

    def kill_children(self) -> None:
        """Rank 0: SIGKILL every follower (a stopped one too), and remove the rendezvous:
        the group is over."""
        self._closing = True
        for child in self.children:
            if child.poll() is None:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.rendezvous_dir is not None:
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)

    def close(self) -> None:
        """Rank 0: asks the followers to stop, waits for them (killing the late ones) and
        leaves the group. A follower: leaves the group."""
        self._closing = True
        if self.comm.profile is not None and self.comm.profile.path:
            self.comm.profile.write()
        if self.rank == 0 and any(c.poll() is None for c in self.children):
            try:
                self.send(STOP)
            except TensorParallelGroupError:
                pass
            for child in self.children:
                try:
                    child.wait(STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    pass
        self.kill_children()
        for child in self.children:
            child.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
