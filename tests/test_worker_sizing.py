"""The CPU worker's pool is sized from the model and the workload and says so in its log,
and an idle worker does not hold its unused pool in resident memory."""
from __future__ import annotations

import argparse
import logging

import pytest

from helpers_peft import make_tiny_llama
from helpers_procs import slora_module, start_process, stop_process
from helpers_stack import PROCESS_ENV
from slora.models.registry import model_config_from_folder, model_config_from_hf
from slora.worker.args import add_engine_args, engine_config_from_args
from slora.worker.sizing import CPU_MAX_NUM_SEQS, cpu_pool_sizing, page_bytes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("sizing") / "base"), num_kv_heads=2)


def config_from_flags(*flags: str):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_config_from_args(parser.parse_args(flags))[0]


def test_cpu_pool_is_kv_for_the_running_requests_plus_their_adapters(base, caplog):
    """Without --num-pages, a CPU worker's pool holds max_num_seqs x max_model_len tokens of
    KV plus, per running request, one adapter of the highest rank on every projection; the
    log line names each figure and flag; --max-num-seqs defaults to CPU_MAX_NUM_SEQS."""
    model = model_config_from_folder(base)
    adapter_pages = model.adapter_num_pages({m: 16 for m in model.lora_modules})
    with caplog.at_level(logging.INFO, logger="slora.worker"):
        config = config_from_flags("--model", base, "--device", "cpu", "--max-model-len",
                                   "300", "--max-lora-rank", "16")
    assert config.scheduler.max_num_seqs == CPU_MAX_NUM_SEQS
    assert config.pool.num_pages == CPU_MAX_NUM_SEQS * (300 + adapter_pages)
    line = next(r.getMessage() for r in caplog.records if "unified pool" in r.getMessage())
    for figure in (f"{config.pool.num_pages} pages", "--max-num-seqs 4",
                   "--max-model-len 300", "--max-lora-rank 16", f"x {adapter_pages} pages"):
        assert figure in line, line
    wider = config_from_flags("--model", base, "--device", "cpu", "--max-model-len", "300",
                              "--max-lora-rank", "16", "--max-num-seqs", "10",
                              "--max-adapter-slots", "3")
    assert wider.pool.num_pages == 10 * 300 + 3 * adapter_pages
    assert config_from_flags("--model", base, "--device", "cpu", "--max-model-len", "300",
                             "--max-lora-rank", "16", "--num-pages", "777"
                             ).pool.num_pages == 777


def test_idle_cpu_worker_does_not_hold_its_unused_pool(base, tmp_path):
    """A worker with a 1 GiB pool, idle after start-up, has far less than 1 GiB resident:
    the pool's memory is taken as it is written. (Its adapter tables, one slot per page
    unless capped, are not the pool: capped here at 8 slots.)"""
    model = model_config_from_folder(base)
    num_pages = (1 << 30) // page_bytes(model, "float32")
    proc, _ = start_process(slora_module(
        "slora.worker.server", "--model", base, "--device", "cpu", "--dtype", "float32",
        "--num-pages", str(num_pages), "--max-model-len", "96", "--max-adapter-slots", "8",
        "--internal-secret-file",
        str(tmp_path / "internal.secret")), "SLORA_READY worker",
        timeout=120, env=PROCESS_ENV)
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            rss_kib = int(next(line for line in f if line.startswith("VmRSS")).split()[1])
    finally:
        stop_process(proc)
    assert rss_kib * 1024 < (1 << 30) // 2, f"idle worker RSS {rss_kib / 1024:.0f} MiB"
    print(f"FIGURE idle CPU worker, tiny model, 1 GiB pool: RSS {rss_kib / 1024:.0f} MiB")


def test_cpu_sizing_rule_alone():
    """The CPU rule is a pure function of the model and the limits."""
    model = model_config_from_hf(dict(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5), name="t")
    sizing = cpu_pool_sizing(model, max_lora_rank=8, max_model_len=100, max_num_seqs=2,
                             max_adapter_slots=64, dtype="float32")
    assert sizing.num_pages == 200 + 2 * model.adapter_num_pages(
        {m: 8 for m in model.lora_modules})
