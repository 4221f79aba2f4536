"""A Mistral whose sliding window is shorter than the context served is refused at start-up
by name: attention here sees the whole context, so past the window it would be served wrong."""
from __future__ import annotations

import os
import subprocess

import pytest

from helpers_procs import slora_module
from slora.common.config import EngineConfig, ModelConfig, PoolConfig, SchedulerConfig
from slora.common.errors import ConfigError

TINY_MISTRAL = dict(
    model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=160,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, hidden_act="silu",
)


def engine_config(model: ModelConfig, max_model_len: int) -> EngineConfig:
    return EngineConfig(model=model, pool=PoolConfig(num_pages=4096, max_lora_rank=8),
                        scheduler=SchedulerConfig(max_model_len=max_model_len))


def test_window_shorter_than_max_model_len_is_refused_naming_both():
    model = ModelConfig.from_hf_dict(dict(TINY_MISTRAL, sliding_window=12))
    with pytest.raises(ConfigError, match="sliding_window 12 is shorter than max_model_len 64"):
        engine_config(model, 64)


@pytest.mark.parametrize("fields, max_model_len", [
    (dict(TINY_MISTRAL, sliding_window=64), 64),  # the window covers the whole context
    (dict(TINY_MISTRAL, sliding_window=None), 512),  # Mistral v0.2 and later: no window
    (dict(TINY_MISTRAL, model_type="llama", sliding_window=12), 64),  # Llama has none
])
def test_window_covering_the_context_or_none_is_served(fields, max_model_len):
    assert engine_config(ModelConfig.from_hf_dict(fields), max_model_len).model


def test_worker_refuses_a_short_window_at_start_up(tmp_path):
    """The worker process exits 1 at start with the refusal, before it loads weights."""
    from transformers import MistralConfig, MistralForCausalLM

    fields = {k: v for k, v in TINY_MISTRAL.items() if k != "model_type"}
    folder = str(tmp_path / "tiny-mistral")
    MistralForCausalLM(MistralConfig(**fields, sliding_window=12)).save_pretrained(folder)
    proc = subprocess.run(
        slora_module("slora.worker.server", "--model", folder, "--max-model-len", "64",
                     "--device", "cpu", "--num-pages", "512", "--max-lora-rank", "8"),
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "sliding_window 12 is shorter than max_model_len 64" in proc.stderr, proc.stderr
