"""config.json picks the family: each supported model_type gives its features, and what slora
does not serve (an unknown model_type, Qwen2's per-layer sliding windows, another rope
scaling, biases a family does not have) is refused by name, at start-up of the worker
process too. A Mistral whose window is shorter than the context is served (exactly:
tests/test_families_vs_peft.py), not refused."""
from __future__ import annotations

import os
import subprocess

import pytest

from helpers_procs import slora_module
from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.errors import ConfigError
from slora.models.registry import model_config_from_hf

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             hidden_act="silu")


@pytest.mark.parametrize("fields, expect", [
    (dict(model_type="mistral", sliding_window=12), dict(sliding_window=12)),
    (dict(model_type="mistral", sliding_window=None), dict(sliding_window=0)),  # v0.2+
    (dict(model_type="mistral", sliding_window=4096), dict(sliding_window=0)),  # > any context
    (dict(model_type="llama", sliding_window=12), dict(sliding_window=0)),  # Llama has none
    (dict(model_type="qwen2", sliding_window=32768, use_sliding_window=False),
     dict(sliding_window=0, qkv_bias=True)),
    (dict(model_type="qwen3", head_dim=32), dict(qk_norm=True, head_dim=32, qkv_bias=False)),
])
def test_each_family_gets_its_features(fields, expect):
    model = model_config_from_hf(dict(SHAPE, **fields), "m")
    assert model.model_type == fields["model_type"]
    assert {k: getattr(model, k) for k in expect} == expect
    config = EngineConfig(model=model, pool=PoolConfig(num_pages=4096, max_lora_rank=8),
                          scheduler=SchedulerConfig(max_model_len=64))
    assert config.model is model  # a window shorter than max_model_len is served


@pytest.mark.parametrize("fields, words", [
    (dict(model_type="gemma2"), "model_type 'gemma2' is not supported; supported: llama, "
                                "mistral, qwen2, qwen3"),
    (dict(model_type="qwen2", use_sliding_window=True), "qwen2 with use_sliding_window=True"),
    (dict(model_type="qwen3", use_sliding_window=True), "qwen3 with use_sliding_window=True"),
    (dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention"]),
     "qwen2 with layer_types="),
    (dict(model_type="llama", rope_scaling=dict(rope_type="yarn", factor=4.0)),
     "rope_scaling type 'yarn' is not supported"),
    (dict(model_type="llama", attention_bias=True), "llama with attention_bias=True"),
    (dict(model_type="qwen3", attention_bias=True), "qwen3 with attention_bias=True"),
    (dict(model_type="mistral", hidden_act="gelu"), "mistral with hidden_act='gelu'"),
])
def test_what_is_not_served_is_refused_by_name(fields, words):
    with pytest.raises(ConfigError, match=None) as info:
        model_config_from_hf(dict(SHAPE, **fields), "m")
    assert words in str(info.value), str(info.value)


def test_worker_refuses_an_unsupported_feature_at_start_up(tmp_path):
    """The worker process exits 1 at start naming the feature, before it loads weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in SHAPE.items() if k != "hidden_act"}
    folder = str(tmp_path / "tiny-qwen2")
    Qwen2ForCausalLM(Qwen2Config(**fields, use_sliding_window=True, sliding_window=16,
                                 max_window_layers=1)).save_pretrained(folder)
    proc = subprocess.run(
        slora_module("slora.worker.server", "--model", folder, "--max-model-len", "64",
                     "--device", "cpu", "--num-pages", "512", "--max-lora-rank", "8"),
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "qwen2 with use_sliding_window=True is not supported" in proc.stderr, proc.stderr
