"""The worker process of the serving benchmark: `slora.worker.server` exactly, except that its
host-memory adapter cache also makes `dummy-adapter://` adapters (bench/workload.py) from
their seed instead of reading a PEFT folder.

    python -m slora.bench.dummy_worker [--dummy-ranks 64,32,16,8] <slora-worker flags>

The worker builds its Worker (worker/executor.py) inside `serve`; we hand it a subclass that
swaps in a HostAdapterCache with our loader (its public constructor: capacity and loader),
so nothing in worker/ changes. Any other path still loads as a PEFT folder.
"""
from __future__ import annotations

import argparse
import sys

from slora.adapter_store import HostAdapterCache
from slora.bench.workload import DummyAdapterFactory, dummy_adapter_loader
from slora.worker import server
from slora.worker.executor import Worker

_prepare_ranks: list[int] = []


def install_dummy_adapters(worker: Worker, prepare_ranks=()) -> DummyAdapterFactory:
    """Gives `worker` a host cache that makes dummy adapters in host memory (same capacity,
    least recently used out first, as the worker's own); returns the factory."""
    config = worker.config
    pin = worker.device.type == "cuda"
    factory = DummyAdapterFactory(config.model, worker.dtype, pin_memory=pin, seed=config.seed)
    factory.prepare(prepare_ranks)
    worker.host_cache = HostAdapterCache(
        config.host_cache_bytes,
        dummy_adapter_loader(factory, config.pool.max_lora_rank, pin_memory=pin))
    return factory


class DummyAdapterWorker(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_dummy_adapters(self, _prepare_ranks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dummy-ranks", default="",
                        help="ranks whose weight banks to make at start, comma-separated")
    args, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    _prepare_ranks[:] = [int(r) for r in args.dummy_ranks.split(",") if r]
    server.Worker = DummyAdapterWorker  # the one name serve() builds its worker from
    server.main(rest)


if __name__ == "__main__":
    main()
