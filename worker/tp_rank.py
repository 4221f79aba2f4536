"""A follower rank of the tensor-parallel worker group (ranks 1..N-1): `python -m
slora.worker.tp_rank`, started by rank 0 (tp_group.py `launch`) with its RankSpec as JSON on
stdin. It builds its shard of the worker, then runs every message rank 0 broadcasts, in
order, until STOP: steps (forward passes whose collectives meet rank 0's), resets and pings.
It never samples and answers nothing; anything that goes wrong ends the process, which takes
the group down (rank 0 sees it exit)."""
from __future__ import annotations

import base64
import ctypes
import json
import logging
import os
import signal
import sys

from slora.common.config import MemorySizing
from slora.common.logs import setup_logging
from slora.protos.model_info import engine_config_from_model_info
from slora.protos.convert import step_command_from_proto
from slora.v1 import scheduler_pb2, worker_pb2
from slora.worker.tp_group import (
    EAGER, PING, RESET, STEP, STOP, RankSpec, TensorParallelGroup,
)

log = logging.getLogger("slora.worker.tp")

worker_class = None
"""The Worker class a follower builds (None: worker/executor.py's); the serving benchmark's
followers build theirs (bench/dummy_worker.py)."""
PR_SET_PDEATHSIG = 1
EXIT_GROUP_DOWN = 3


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when rank 0 exits, however it exits (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # rank 0 died before the line above
        os._exit(EXIT_GROUP_DOWN)


def follow(worker, group: TensorParallelGroup) -> None:
    """Runs rank 0's messages until STOP."""
    while True:
        kind, flags, payload, tokens = group.receive()
        if kind == STOP:
            return
        if kind == RESET:  # drops the requests that the tokens were for
            worker.reset()
            continue
        worker.apply_sampled(tokens)
        if kind == STEP:
            worker.use_cuda_graphs = worker.graphs is not None and not flags & EAGER
            worker.run_step(step_command_from_proto(worker_pb2.StepCommand.FromString(payload)))
        elif kind == PING:
            group.ping()
        else:
            raise RuntimeError(f"unknown tensor-parallel message kind {kind}")


def main() -> None:
    spec = RankSpec(**json.loads(sys.stdin.read()))
    _die_with_parent(spec.parent_pid)
    setup_logging(f"worker-rank{spec.rank}", "INFO", "json")
    from slora.worker.executor import Worker

    cls = worker_class or Worker
    config = engine_config_from_model_info(
        scheduler_pb2.ModelInfo.FromString(base64.b64decode(spec.model_info)))
    if spec.memory_sizing is not None:  # measured on every rank, agreed on by the group
        config.memory_sizing = MemorySizing(*spec.memory_sizing)
    group = TensorParallelGroup.join(spec, config.device)
    try:
        worker = cls(config, spec.model_path, spec.backend, spec.cuda_graphs, group=group)
        print(f"SLORA_TP_RANK rank={spec.rank} pid={os.getpid()}", flush=True)
        group.wait_ready()
        follow(worker, group)
    except Exception:
        log.exception("tensor-parallel rank %d failed; the group goes down", spec.rank)
        os._exit(EXIT_GROUP_DOWN)
    group.close()


if __name__ == "__main__":
    main()
