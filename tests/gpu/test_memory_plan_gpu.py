"""The worker sized from measured memory on CUDA (worker/memory_plan.py): with no pool or
batch flags it measures its weights and a dry run of its largest step, picks the pool and
the batch, logs why, captures its graphs, and then uses no more of the GPU than
--gpu-memory-utilization allows; it serves tokens afterwards. Marked `gpu`; skipped without
CUDA or CuPy."""
from __future__ import annotations

import argparse
import importlib.util
import logging

import pytest
import torch

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and CuPy")]

HEADROOM_GIB = 12.0
"""The worker's share of the GPU in the test (--gpu-memory-utilization of it)."""


def test_worker_sized_from_memory_stays_within_its_share(caplog):
    from slora.common.sampling_params import SamplingParams
    from slora.engine.engine import Engine
    from slora.worker.args import add_engine_args, engine_config_from_args
    from slora.worker.memory_plan import GIB, MAX_NUM_SEQS, batch_for_pool

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    if free < (HEADROOM_GIB + 2) * GIB:
        pytest.skip(f"needs {HEADROOM_GIB + 2:.0f} GiB free, {free / GIB:.1f} GiB are")
    utilization = HEADROOM_GIB * GIB / total
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config, path = engine_config_from_args(parser.parse_args(
        ["--model", "dummy-qwen2.5-0.5b", "--device", "cuda", "--max-model-len", "1024",
         "--gpu-memory-utilization", f"{utilization:.4f}"]))
    assert config.memory_sizing is not None
    with caplog.at_level(logging.INFO, logger="slora.worker.memory_plan"):
        engine = Engine(config, path)
    plan, = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan")]
    print(plan)
    free_after, _ = torch.cuda.mem_get_info()
    used = free - free_after
    print(f"used {used / GIB:.2f} GiB of the {HEADROOM_GIB:.0f} GiB allowed; "
          f"{config.pool.num_pages} pages, max_num_seqs {config.scheduler.max_num_seqs}")
    assert used <= HEADROOM_GIB * GIB * 1.02, plan
    assert used >= HEADROOM_GIB * GIB * 0.80, plan  # the plan does not leave most of it idle
    assert config.memory_sizing is None and engine.scheduler.config is config
    assert config.scheduler.max_num_seqs == min(
        MAX_NUM_SEQS, batch_for_pool(config.pool.num_pages, 1024))
    outs = engine.generate([[1, 2, 3, 4]] * 3, SamplingParams(max_new_tokens=4))
    assert all(len(o) == 4 for o in outs)
