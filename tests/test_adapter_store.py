"""Spec of adapter_store: PEFT folders parsed into stacked per-module weights exactly as PEFT
itself loads them, every unservable adapter refused with a message naming adapter, file and
reason, and the host cache's least-recently-used eviction by bytes."""
from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
from helpers_peft import edit_adapter_config, make_peft_adapter, make_tiny_llama
from safetensors.torch import load_file, save_file

from slora.adapter_store import (
    HostAdapterCache,
    check_base_model,
    load_peft_adapter,
    read_adapter_config,
)
from slora.adapter_store.peft import CONFIG_FILE, WEIGHTS_FILE, module_full_name
from slora.common.config import STANDARD_LORA_MODULES, ModelConfig
from slora.common.errors import AdapterBaseModelMismatch, AdapterError
from slora.models.registry import model_config_from_folder

MAX_RANK = 64
ADAPTER_ID = "acme-7"


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> str:
    """Tiny grouped-query Llama: H=64, K/V width 32, intermediate 160, 2 layers."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("base") / "tiny-llama"), num_kv_heads=2)


@pytest.fixture(scope="session")
def model(base_dir) -> ModelConfig:
    return model_config_from_folder(base_dir)


@pytest.fixture(scope="session")
def good_adapter(base_dir, tmp_path_factory) -> str:
    """Rank 4, alpha 8, on all seven projections."""
    return make_peft_adapter(base_dir, str(tmp_path_factory.mktemp("good")), r=4,
                             target_modules=list(STANDARD_LORA_MODULES), lora_alpha=8, seed=1)


def peft_lora_layers(base_dir: str, adapter_dir: str) -> dict[tuple[int, str], tuple]:
    """PEFT's own view of an adapter: (layer, module) -> (A [r, d_in], B [d_out, r], scale)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(base, adapter_dir)
    out = {}
    for layer_idx, layer in enumerate(peft_model.base_model.model.model.layers):
        for m in STANDARD_LORA_MODULES:
            mod = getattr(layer.self_attn if m in ("q_proj", "k_proj", "v_proj", "o_proj")
                          else layer.mlp, m)
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                out[(layer_idx, m)] = (mod.lora_A["default"].weight.detach(),
                                       mod.lora_B["default"].weight.detach(),
                                       mod.scaling["default"])
    return out


@dataclass
class PeftCase:
    name: str
    kwargs: dict
    """make_peft_adapter arguments beyond the base and folder."""
    layer_ranks: dict
    """Expected rank of each targeted module at layers 0 and 1 (0: not covered)."""


PEFT_CASES = [
    PeftCase("plain", dict(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=16),
             {"q_proj": (4, 4), "v_proj": (4, 4)}),
    PeftCase("rslora", dict(r=16, target_modules=["k_proj", "down_proj"], lora_alpha=8,
                            use_rslora=True),
             {"k_proj": (16, 16), "down_proj": (16, 16)}),
    PeftCase("regex", dict(r=8, target_modules=r".*\.(o|up)_proj", lora_alpha=4),
             {"o_proj": (8, 8), "up_proj": (8, 8)}),
    PeftCase("layers_to_transform", dict(r=4, target_modules=["q_proj", "gate_proj"],
                                         lora_alpha=8, layers_to_transform=[1]),
             {"q_proj": (0, 4), "gate_proj": (0, 4)}),
    # One module with different ranks and scales at different layers: padded and folded.
    PeftCase("rank_and_alpha_patterns", dict(
        r=4, target_modules=["q_proj", "up_proj", "down_proj"], lora_alpha=8,
        rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 8},
        alpha_pattern={"up_proj": 32}),
             {"q_proj": (4, 8), "up_proj": (4, 4), "down_proj": (2, 2)}),
    PeftCase("exclude_modules", dict(r=4, target_modules=["v_proj", "o_proj"], lora_alpha=8,
                                     exclude_modules=r"model\.layers\.0\.self_attn\.o_proj"),
             {"v_proj": (4, 4), "o_proj": (0, 4)}),
]


@pytest.mark.parametrize("case", PEFT_CASES, ids=lambda c: c.name)
def test_loaded_adapter_computes_what_peft_computes(case, base_dir, model, tmp_path):
    """For every layer and projection, module_scales[m] * B[l] @ A[l] equals PEFT's
    scaling * lora_B @ lora_A after PeftModel.from_pretrained; A and B are PEFT's own tensors
    (zero-padded to the module's rank) and are zero where PEFT put no LoRA layer."""
    path = make_peft_adapter(base_dir, str(tmp_path / case.name), seed=3, **case.kwargs)
    adapter = load_peft_adapter(ADAPTER_ID, path, model, MAX_RANK)
    peft_layers = peft_lora_layers(base_dir, path)

    assert adapter.layer_ranks == case.layer_ranks
    assert set(adapter.weights) == {m for _, m in peft_layers}
    assert list(adapter.weights) == [m for m in STANDARD_LORA_MODULES if m in adapter.weights]
    for m, (a, b) in adapter.weights.items():
        d_in, d_out = model.module_shape(m)
        r = adapter.module_ranks[m]
        assert r == max(pa.shape[0] for (_, pm), (pa, _, _) in peft_layers.items() if pm == m)
        assert a.shape == (model.num_layers, r, d_in) and b.shape == (model.num_layers, d_out, r)
        assert a.is_contiguous() and b.is_contiguous() and a.device.type == "cpu"
        for layer in range(model.num_layers):
            if (layer, m) not in peft_layers:
                assert not a[layer].any() and not b[layer].any(), (m, layer)
                continue
            pa, pb, scale = peft_layers[(layer, m)]
            r_l = pa.shape[0]
            assert torch.equal(a[layer, :r_l], pa) and not a[layer, r_l:].any()
            assert not b[layer, :, r_l:].any()
            if scale == adapter.module_scales[m]:
                assert torch.equal(b[layer, :, :r_l], pb)
            torch.testing.assert_close(adapter.module_scales[m] * b[layer] @ a[layer],
                                       scale * pb @ pa)
    assert adapter.rank == max(adapter.module_ranks.values())
    assert adapter.num_pages(model) == model.adapter_num_pages(adapter.module_ranks)


def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora(base_dir, model, tmp_path):
    """lora_alpha / r normally; lora_alpha / sqrt(r) with use_rslora."""
    plain = make_peft_adapter(base_dir, str(tmp_path / "plain"), r=16, lora_alpha=8,
                              target_modules=["q_proj"])
    rs = make_peft_adapter(base_dir, str(tmp_path / "rs"), r=16, lora_alpha=8,
                           target_modules=["q_proj"], use_rslora=True)
    assert read_adapter_config("p", plain, model, MAX_RANK).module_scales == {"q_proj": 0.5}
    spec = read_adapter_config("r", rs, model, MAX_RANK)
    assert spec.module_scales == {"q_proj": 2.0} and spec.use_rslora


def test_regex_target_modules_select_matching_projections_only(base_dir, model, tmp_path):
    """A regex target_modules is full-matched against module names, as PEFT does."""
    path = make_peft_adapter(base_dir, str(tmp_path / "a"), r=4, lora_alpha=8,
                             target_modules=r"model\.layers\.1\.mlp\.(gate|down)_proj")
    spec = read_adapter_config(ADAPTER_ID, path, model, MAX_RANK)
    assert spec.module_ranks == {"gate_proj": 4, "down_proj": 4}
    assert spec.layer_ranks == {"gate_proj": (0, 4), "down_proj": (0, 4)}


def test_layers_to_transform_leaves_other_layers_zero(base_dir, model, tmp_path):
    """Layers outside layers_to_transform have rank 0 and all-zero A and B."""
    path = make_peft_adapter(base_dir, str(tmp_path / "a"), r=4, lora_alpha=8,
                             target_modules=["v_proj"], layers_to_transform=[0])
    adapter = load_peft_adapter(ADAPTER_ID, path, model, MAX_RANK)
    a, b = adapter.weights["v_proj"]
    assert adapter.layer_ranks == {"v_proj": (4, 0)}
    assert a[0].any() and b[0].any() and not a[1].any() and not b[1].any()


def test_weights_come_in_the_requested_dtype(good_adapter, model):
    """dtype converts every tensor; num_bytes counts them at that width."""
    f32 = load_peft_adapter(ADAPTER_ID, good_adapter, model, MAX_RANK)
    bf16 = load_peft_adapter(ADAPTER_ID, good_adapter, model, MAX_RANK, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for ab in bf16.weights.values() for t in ab)
    assert bf16.num_bytes * 2 == f32.num_bytes
    expected = sum(model.num_layers * 4 * sum(model.module_shape(m)) for m in STANDARD_LORA_MODULES) * 4
    assert f32.num_bytes == expected


def test_pin_memory_pins_where_cuda_is_available(good_adapter, model):
    """pin_memory pins the weights for fast host-to-GPU copies; without CUDA it is a no-op."""
    adapter = load_peft_adapter(ADAPTER_ID, good_adapter, model, MAX_RANK, pin_memory=True)
    a, b = adapter.weights["q_proj"]
    assert a.is_pinned() == b.is_pinned() == torch.cuda.is_available()


def test_all_linear_targets_every_projection(good_adapter, model, tmp_path):
    """PEFT's "all-linear" shorthand means all seven projections (never lm_head)."""
    path = _edit_config(target_modules="all-linear")(
        str(shutil.copytree(good_adapter, tmp_path / "a")))
    spec = read_adapter_config(ADAPTER_ID, path, model, MAX_RANK)
    assert list(spec.module_ranks) == list(STANDARD_LORA_MODULES)


def test_read_adapter_config_reads_no_tensors(good_adapter, model, tmp_path):
    """read_adapter_config validates the config only: corrupt weights pass it, not the load."""
    path = shutil.copytree(good_adapter, tmp_path / "a")
    (path / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    spec = read_adapter_config(ADAPTER_ID, str(path), model, MAX_RANK)
    assert spec.module_ranks == {m: 4 for m in STANDARD_LORA_MODULES}
    assert spec.base_model_name and spec.base_model_name.endswith("tiny-llama")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_peft_adapter(ADAPTER_ID, str(path), model, MAX_RANK)


# ---- refusals --------------------------------------------------------------------------------

def _edit_config(**changes):
    return lambda path: edit_adapter_config(path, **changes)


def _edit_weights(fn):
    def edit(path):
        weights_file = os.path.join(path, WEIGHTS_FILE)
        tensors = load_file(weights_file)
        fn(tensors)
        save_file(tensors, weights_file)
        return path
    return edit


def _write(name, data: bytes, remove=()):
    def edit(path):
        for r in remove:
            os.remove(os.path.join(path, r))
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
        return path
    return edit


def _remove(name):
    def edit(path):
        os.remove(os.path.join(path, name))
        return path
    return edit


def _key(layer, module, which):
    return f"base_model.model.{module_full_name(layer, module)}.lora_{which}.weight"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _poison(key, value):
    def fn(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value
    return fn


Q_A, Q_B = _key(1, "q_proj", "A"), _key(1, "q_proj", "B")

REFUSALS = [  # (name, edit of a copy of the good adapter -> path to load, file, reason)
    ("path_missing", lambda p: p + "-gone", "-gone", "adapter path does not exist"),
    ("path_is_file", lambda p: os.path.join(p, CONFIG_FILE), CONFIG_FILE, "not a directory"),
    ("config_missing", _remove(CONFIG_FILE), CONFIG_FILE, f"{CONFIG_FILE} is missing"),
    ("config_malformed", _write(CONFIG_FILE, b"{\"r\": 4,"), CONFIG_FILE, "not valid JSON"),
    ("config_not_object", _write(CONFIG_FILE, b"[4]"), CONFIG_FILE,
     "expected a JSON object, found list"),
    ("peft_type_not_lora", _edit_config(peft_type="IA3"), CONFIG_FILE,
     "peft_type 'IA3' is not LORA"),
    ("pickle_only", _write("adapter_model.bin", b"\x80\x04K\x01.", remove=[WEIGHTS_FILE]),
     "adapter_model.bin", "pickle adapters are refused; convert to safetensors"),
    ("weights_missing", _remove(WEIGHTS_FILE), WEIGHTS_FILE, f"{WEIGHTS_FILE} is missing"),
    ("weights_corrupt", _write(WEIGHTS_FILE, b"\xff" * 64), WEIGHTS_FILE,
     "not a readable safetensors file"),
    ("rank_zero", _edit_config(r=0), CONFIG_FILE, "r must be a positive integer, found 0"),
    ("rank_not_int", _edit_config(r="4"), CONFIG_FILE, "r must be a positive integer, found '4'"),
    ("rank_over_pool", _edit_config(r=128), CONFIG_FILE,
     "rank 128 exceeds this pool's max_lora_rank 64"),
    ("rank_pattern_over_pool", _edit_config(rank_pattern={"q_proj": 65}), CONFIG_FILE,
     "rank_pattern gives 'q_proj' rank 65, which exceeds this pool's max_lora_rank 64"),
    ("alpha_not_number", _edit_config(lora_alpha=None), CONFIG_FILE,
     "lora_alpha must be a finite number, found None"),
    ("target_lm_head", _edit_config(target_modules=["q_proj", "lm_head"]), CONFIG_FILE,
     "matches 'lm_head'; only the q, k, v, o, gate, up, down projections can be served"),
    ("target_regex_embed_tokens", _edit_config(target_modules=r".*(q_proj|embed_tokens)"),
     CONFIG_FILE, "matches 'model.embed_tokens'"),
    ("target_unknown_name", _edit_config(target_modules=["q_proj", "c_attn"]), CONFIG_FILE,
     "entry 'c_attn' matches none of the q, k, v, o, gate, up, down projections"),
    ("target_modules_missing", _edit_config(target_modules=None), CONFIG_FILE,
     "target_modules must be a non-empty list of names or a regex, found None"),
    ("target_regex_invalid", _edit_config(target_modules="q_proj(("), CONFIG_FILE,
     "not a valid regular expression"),
    ("use_dora", _edit_config(use_dora=True), CONFIG_FILE, "DoRA adapters (use_dora)"),
    ("bias", _edit_config(bias="lora_only"), CONFIG_FILE,
     "bias 'lora_only' is not supported (only 'none')"),
    ("modules_to_save", _edit_config(modules_to_save=["lm_head"]), CONFIG_FILE,
     "modules_to_save (full copies of base modules) is not supported"),
    ("pissa_unconverted", _edit_config(init_lora_weights="pissa"), CONFIG_FILE,
     "init_lora_weights='pissa' changes the base weights"),
    ("unknown_variant", _edit_config(use_foo=True), CONFIG_FILE,
     "use_foo=True is a LoRA variant this server does not know"),
    ("layers_to_transform_out_of_range", _edit_config(layers_to_transform=[5]), CONFIG_FILE,
     "layers_to_transform names layer 5; this model has layers 0..1"),
    ("lora_embedding_key", _edit_weights(_set(
        "base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 256))),
     WEIGHTS_FILE, "is a LoRA embedding weight"),
    ("key_does_not_parse", _edit_weights(_set("base_model.model.lm_head.lora_A.weight",
                                              torch.zeros(4, 64))),
     WEIGHTS_FILE, "does not parse; expected [base_model.model.][model.]layers.{i}."),
    ("key_wrong_parent", _edit_weights(_set(
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", torch.zeros(4, 64))),
     WEIGHTS_FILE, "mlp.q_proj is not one of the"),
    ("layer_out_of_range", _edit_weights(_set(_key(7, "q_proj", "A"), torch.zeros(4, 64))),
     WEIGHTS_FILE, "is for layer 7; this server's base model 'tiny-llama' has layers 0..1"),
    ("module_not_targeted", _edit_config(target_modules=["q_proj", "v_proj"]), WEIGHTS_FILE,
     "which target_modules does not name (targets: q_proj, v_proj)"),
    ("layer_not_covered", _edit_config(layers_to_transform=[1]), WEIGHTS_FILE,
     "at layer 0, which the config does not cover"),
    ("missing_A", _edit_weights(lambda t: t.pop(Q_A)), WEIGHTS_FILE,
     f"tensor '{Q_A}' is missing: the config targets q_proj at layer 1"),
    ("missing_B", _edit_weights(lambda t: t.pop(Q_B)), WEIGHTS_FILE,
     f"tensor '{Q_B}' is missing"),
    ("shape_mismatch", _edit_weights(_set(Q_A, torch.zeros(4, 32))), WEIGHTS_FILE,
     f"tensor '{Q_A}' (q_proj lora_A at layer 1) has shape [4, 32]; this server's base "
     "model 'tiny-llama' needs [4, 64]"),
    ("rank_differs_from_config", _edit_config(r=8), WEIGHTS_FILE,
     "has shape [4, 160]; expected [8, 160]"),
    ("integer_dtype", _edit_weights(_set(Q_B, torch.zeros(64, 4, dtype=torch.int32))),
     WEIGHTS_FILE, "dtype 'I32' is not allowed; expected a floating-point dtype"),
    ("nan", _edit_weights(_poison(Q_A, float("nan"))), WEIGHTS_FILE, "has NaN or Inf values"),
    ("inf", _edit_weights(_poison(Q_B, float("-inf"))), WEIGHTS_FILE, "has NaN or Inf values"),
]


@pytest.mark.parametrize("name, edit, file, reason", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_unservable_adapter_is_refused_naming_adapter_file_and_reason(
        name, edit, file, reason, good_adapter, model, tmp_path):
    """Each defect of a PEFT folder raises AdapterError whose message names the adapter id,
    the offending file and what is wrong."""
    path = edit(str(shutil.copytree(good_adapter, tmp_path / "adapter")))
    with pytest.raises(AdapterError) as info:
        load_peft_adapter(ADAPTER_ID, path, model, MAX_RANK)
    message = str(info.value)
    assert repr(ADAPTER_ID) in message
    assert file in (info.value.file or "") and file in message
    assert reason in info.value.reason, message


def test_base_model_name_that_differs_warns_and_strict_refuses(good_adapter, model):
    """check_base_model compares last path components case-insensitively: a name that
    differs gives a warning naming both, or with strict an AdapterBaseModelMismatch; an
    unknown name passes, except that strict wants the adapter to name one."""
    spec = read_adapter_config(ADAPTER_ID, good_adapter, model, MAX_RANK)
    assert check_base_model(spec, "someorg/Tiny-Llama", strict=True) is None
    assert check_base_model(spec, None, strict=True) is None
    warning = check_base_model(spec, "meta-llama/Llama-2-7b-hf")
    assert "not 'meta-llama/Llama-2-7b-hf'" in warning and spec.base_model_name in warning
    with pytest.raises(AdapterBaseModelMismatch, match="this server serves 'meta-llama/Llama-2"):
        check_base_model(spec, "meta-llama/Llama-2-7b-hf", strict=True)
    spec.base_model_name = None
    assert check_base_model(spec, "meta-llama/Llama-2-7b-hf") is None
    with pytest.raises(AdapterBaseModelMismatch, match="names no base_model_name_or_path"):
        check_base_model(spec, "meta-llama/Llama-2-7b-hf", strict=True)


# ---- host cache -------------------------------------------------------------------------------

@pytest.fixture
def three_adapters(good_adapter, tmp_path) -> dict[str, str]:
    """Three same-size adapters a, b, c (copies of the good one)."""
    return {i: str(shutil.copytree(good_adapter, tmp_path / i)) for i in "abc"}


def test_cache_evicts_least_recently_used_by_bytes(three_adapters, model):
    """Room for two: after a, b, a, c the cache holds a and c; b was the one evicted."""
    size = load_peft_adapter("x", three_adapters["a"], model, MAX_RANK).num_bytes
    cache = HostAdapterCache(int(2.5 * size), model=model, max_rank=MAX_RANK)
    for i in "aba":
        cache.get(i, three_adapters[i])
    first_a = cache.get("a", three_adapters["a"])
    cache.get("c", three_adapters["c"])
    assert cache.adapter_ids() == ["a", "c"]
    assert (cache.hits, cache.misses, cache.evictions) == (2, 3, 1)
    assert cache.num_bytes == 2 * size
    assert cache.get("a", three_adapters["a"]) is first_a
    assert "b" not in cache


def test_adapter_larger_than_cache_is_returned_but_not_kept(three_adapters, base_dir, model,
                                                            tmp_path):
    """An adapter bigger than the whole capacity is served, not kept, and evicts nothing."""
    big_path = make_peft_adapter(base_dir, str(tmp_path / "big"), r=8, lora_alpha=8,
                                 target_modules=list(STANDARD_LORA_MODULES))
    small_size = load_peft_adapter("x", three_adapters["a"], model, MAX_RANK).num_bytes
    cache = HostAdapterCache(small_size + 1, model=model, max_rank=MAX_RANK)
    small = cache.get("a", three_adapters["a"])
    big = cache.get("big", big_path)
    assert big.num_bytes == 2 * small_size and big.module_ranks["q_proj"] == 8
    assert cache.adapter_ids() == ["a"] and cache.num_bytes == small_size
    assert cache.evictions == 0 and cache.get("a", three_adapters["a"]) is small


def test_invalidate_drops_the_adapter_and_next_get_reloads(three_adapters, model):
    """invalidate forgets the adapter and its bytes; the next get is a miss."""
    cache = HostAdapterCache(1 << 30, model=model, max_rank=MAX_RANK)
    first = cache.get("a", three_adapters["a"])
    assert cache.invalidate("a") and not cache.invalidate("a")
    assert cache.num_bytes == 0
    assert cache.get("a", three_adapters["a"]) is not first
    assert cache.misses == 2


def test_load_errors_propagate_and_nothing_is_cached(model, tmp_path):
    """A loader's AdapterError reaches the caller; the cache stays empty."""
    cache = HostAdapterCache(1 << 30, model=model, max_rank=MAX_RANK)
    with pytest.raises(AdapterError, match="does not exist"):
        cache.get("gone", str(tmp_path / "gone"))
    assert len(cache) == 0 and cache.num_bytes == 0


def test_concurrent_misses_of_one_adapter_load_it_once(three_adapters, model):
    """Eight threads asking for one cold adapter share one load and get the same object."""
    calls = []

    def slow_loader(adapter_id, path):
        calls.append(adapter_id)
        time.sleep(0.05)
        return load_peft_adapter(adapter_id, path, model, MAX_RANK)

    cache = HostAdapterCache(1 << 30, slow_loader)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        cache.get("a", three_adapters["a"]))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"] and len(results) == 8
    assert all(r is results[0] for r in results)
