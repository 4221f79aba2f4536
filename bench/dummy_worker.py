"""The worker process of the serving benchmark: `slora.worker.server` exactly, except that its
host-memory adapter cache also makes `dummy-adapter://` adapters (bench/workload.py) from
their seed instead of reading a PEFT folder.

    python -m slora.bench.dummy_worker [--dummy-ranks 64,32,16,8] <slora-worker flags>

With --tensor-parallel-size N its ranks 1..N-1 are this module too (`--tp-follower`:
worker/tp_rank.py building the same subclass), so that every rank makes the same dummy
adapters (same seeds) and slices its own shard.

The worker builds its Worker (worker/executor.py) inside `serve`; we hand it a subclass that
swaps in a HostAdapterCache with our loader (its public constructor: capacity and loader),
so nothing in worker/ changes. Any other path still loads as a PEFT folder.
"""
from __future__ import annotations

import argparse
import os
import sys

from slora.adapter_store import HostAdapterCache
from slora.bench.workload import DummyAdapterFactory, dummy_adapter_loader
from slora.models.sharding import shard_plan
from slora.worker import server, tp_rank
from slora.worker.executor import Worker
from slora.worker.pool import shard_adapter
from slora.worker.tp_group import TensorParallelGroup

_prepare_ranks: list[int] = []
RANKS_ENV = "SLORA_BENCH_DUMMY_RANKS"
"""The --dummy-ranks of rank 0, for its followers (they inherit its environment)."""


def install_dummy_adapters(worker: Worker, prepare_ranks=()) -> DummyAdapterFactory:
    """Gives `worker` a host cache that makes dummy adapters in host memory (same capacity,
    least recently used out first, as the worker's own; a tensor-parallel rank keeps its
    shard of each, as the worker's own does); returns the factory."""
    config, group = worker.config, worker.group
    pin = worker.device.type == "cuda"
    whole = pin and group is None  # a rank of a group pins its shard, not the whole adapter
    factory = DummyAdapterFactory(config.model, worker.dtype, pin_memory=whole, seed=config.seed)
    factory.prepare(prepare_ranks)
    load = dummy_adapter_loader(factory, config.pool.max_lora_rank, pin_memory=whole)
    if group is not None:
        plan = shard_plan(config.model, group.rank, group.size)
        whole_load = load

        def load(adapter_id: str, path: str):
            return shard_adapter(whole_load(adapter_id, path), plan, pin)
    worker.host_cache = HostAdapterCache(config.host_cache_bytes, load)
    return factory


class DummyAdapterWorker(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_dummy_adapters(self, _prepare_ranks)


def use_dummy_followers(prepare_ranks=()) -> None:
    """Makes the tensor-parallel ranks this process starts build DummyAdapterWorkers."""
    os.environ[RANKS_ENV] = ",".join(map(str, sorted(set(prepare_ranks))))
    TensorParallelGroup.rank_command = ("slora.bench.dummy_worker", "--tp-follower")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dummy-ranks", default="",
                        help="ranks whose weight banks to make at start, comma-separated")
    parser.add_argument("--tp-follower", action="store_true",
                        help="run as rank 1..N-1 of a tensor-parallel group (rank 0 passes it)")
    args, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if args.tp_follower:
        _prepare_ranks[:] = [int(r) for r in os.environ.get(RANKS_ENV, "").split(",") if r]
        tp_rank.worker_class = DummyAdapterWorker
        tp_rank.main()
        return
    _prepare_ranks[:] = [int(r) for r in args.dummy_ranks.split(",") if r]
    use_dummy_followers(_prepare_ranks)
    server.Worker = DummyAdapterWorker  # the one name serve() builds its worker from
    server.main(rest)


if __name__ == "__main__":
    main()
