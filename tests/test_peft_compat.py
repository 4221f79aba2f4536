"""Adapters made with PEFT itself, every way PEFT makes or saves them: each one slora accepts
gives PEFT's greedy tokens through the engine (fp32), each one it refuses gets its status
and a message naming the field or key. The table is docs/ADAPTERS.md's, case by case.

Each adapter goes through the registration check (the content store's copy-and-validate, as
the frontend runs it), then into one engine that serves all the accepted ones in mixed
batches. The oracle of each case is the PEFT loader that applies its layout:
PeftModel.from_pretrained, or transformers' load_adapter for keys without PEFT's prefix.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from helpers_peft import edit_adapter_config, make_peft_adapter, make_tiny_llama
from slora.adapter_store.content_store import ContentStore
from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.errors import AdapterError
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.models.registry import model_config_from_folder

MAX_RANK = 16
NUM_NEW_TOKENS = 6
PROMPTS = [[5, 17, 33, 9], [200, 3, 77, 41, 12, 8, 150, 99, 64], [42] * 3 + [7, 250, 1]]
QV = ("q_proj", "v_proj")


@dataclass
class Env:
    trained_from: str
    """The base model folder PEFT loaded when it made the adapters: their
    base_model_name_or_path."""
    served: str
    """The same weights in another folder, whose name is the served model's."""
    root: str


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Env, str], str]
    """(env, out_dir) -> the adapter folder."""
    oracle: str = "peft"
    """Which loader applies the layout: "peft" (PeftModel) or "transformers"."""
    adapter_name: str = "default"
    """The name the oracle loads the adapter under."""
    refused: tuple[str, ...] = ()
    """For a refused case: the status code, then words the message must hold."""


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # PEFT warns about what these cases do on purpose
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def peft_made(**lora_kwargs) -> Callable[[Env, str], str]:
    """An adapter made with get_peft_model on the base folder, random A and B."""
    lora_kwargs.setdefault("target_modules", QV)
    lora_kwargs.setdefault("r", 4)
    return lambda env, out: _quiet(make_peft_adapter, env.trained_from, out, **lora_kwargs)


def rekeyed(rename: Callable[[str], str], **lora_kwargs) -> Callable[[Env, str], str]:
    """A PEFT adapter whose tensor keys are rewritten by `rename`."""
    def make(env, out):
        from safetensors.torch import load_file, save_file

        path = peft_made(**lora_kwargs)(env, out)
        file = os.path.join(path, "adapter_model.safetensors")
        save_file({rename(k): v for k, v in load_file(file).items()}, file)
        return path
    return make


def edited(make: Callable[[Env, str], str], **fields) -> Callable[[Env, str], str]:
    """`make`'s adapter with adapter_config.json fields set as given."""
    return lambda env, out: edit_adapter_config(make(env, out), **fields)


def base_changing(init: str, converted: bool) -> Callable[[Env, str], str]:
    """PEFT's recipe for PiSSA / OLoRA: initialise (PEFT changes W), save the initial adapter
    as plain LoRA, train (here: move A and B), then save either as is or converted against
    the initial one with path_initial_model_for_weight_conversion."""
    def make(env, out):
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(env.trained_from, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=init, lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = _quiet(get_peft_model, model, config)
        initial = out + "-initial"
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(initial)
        peft_model.peft_config["default"].init_lora_weights = init
        gen = torch.Generator().manual_seed(len(init))
        with torch.no_grad():
            for name, param in sorted(peft_model.named_parameters()):
                if ".lora_A." in name or ".lora_B." in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=gen))
        if converted:
            _quiet(peft_model.save_pretrained, out,
                   path_initial_model_for_weight_conversion=initial)
        else:
            peft_model.save_pretrained(out)
        return out
    return make


def two_adapters_in_one_file(env, out):
    def rename(k):  # q_proj's tensors under one adapter name, v_proj's under another
        name = "first" if ".q_proj." in k else "second"
        return k.replace(".weight", f".{name}.weight")
    return rekeyed(rename)(env, out)


def one_weight_twice(env, out):
    """q_proj's A at layer 0 also under transformers' key, without PEFT's prefix."""
    from safetensors.torch import load_file, save_file

    path = peft_made()(env, out)
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, _prefixless(key): tensors[key].clone()}, file)
    return path


def another_base(env, out):
    base = make_tiny_llama(os.path.join(env.root, "hidden-32"), num_kv_heads=2, hidden_size=32)
    return make_peft_adapter(base, out, r=2)


def resized_vocabulary(env, out):
    """Fine-tuned after adding tokens: PEFT saves the resized embeddings and lm_head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(env.trained_from, dtype=torch.float32)
    _quiet(model.resize_token_embeddings, 260, mean_resizing=False)
    peft_model = _quiet(get_peft_model, model, LoraConfig(r=2, target_modules=["q_proj"],
                                                          task_type="CAUSAL_LM"))
    _quiet(peft_model.save_pretrained, out)
    return out


def _prefixless(k: str) -> str:
    return k.removeprefix("base_model.model.")


def _named(name: str) -> Callable[[str], str]:
    return lambda k: k.replace(".weight", f".{name}.weight")


ACCEPTED = [
    Case("local-base-folder", peft_made()),
    Case("default-keys", rekeyed(_named("default"))),
    Case("named-keys", rekeyed(_named("sql")), adapter_name="sql"),
    Case("no-prefix-keys", rekeyed(_prefixless), oracle="transformers"),
    Case("no-prefix-default-keys", rekeyed(lambda k: _named("default")(_prefixless(k))),
         oracle="transformers"),
    Case("layers-only-keys", rekeyed(lambda k: k.removeprefix("base_model.model.model.")),
         oracle="transformers"),
    Case("all-linear", peft_made(target_modules="all-linear", r=2)),
    Case("rslora", peft_made(r=8, lora_alpha=4, use_rslora=True)),
    Case("rank-pattern", peft_made(
        r=8, target_modules=("q_proj", "v_proj", "up_proj"), lora_alpha=16,
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 3},
        alpha_pattern={"up_proj": 5})),
    Case("rslora-rank-pattern", peft_made(r=8, lora_alpha=8, use_rslora=True,
                                          rank_pattern={"q_proj": 2})),
    Case("layers-to-transform", peft_made(target_modules=("q_proj", "o_proj"),
                                          layers_to_transform=[1])),
    Case("regex-targets-exclude", peft_made(target_modules=r".*\.(q_proj|down_proj)",
                                            exclude_modules=["model.layers.0.mlp.down_proj"])),
    Case("layers-pattern", peft_made(target_modules=("k_proj", "gate_proj"),
                                     layers_to_transform=[0], layers_pattern="layers")),
    Case("lora-dropout", peft_made(lora_dropout=0.3)),
    Case("fan-in-fan-out", edited(peft_made(), fan_in_fan_out=True)),
    Case("init-gaussian", peft_made(init_lora_weights="gaussian")),
    Case("init-orthogonal", peft_made(init_lora_weights="orthogonal")),
    Case("init-mica", peft_made(init_lora_weights="mica")),
    Case("init-nora", peft_made(init_lora_weights="nora")),
    Case("init-eva", edited(peft_made(), init_lora_weights="eva")),
    Case("velora", lambda env, out: peft_made(velora_config=_velora())(env, out)),
    Case("pissa-converted", base_changing("pissa", converted=True)),
    Case("olora-converted", base_changing("olora", converted=True)),
]


def _velora():
    from peft import VeloraConfig

    return VeloraConfig()


def _refused_init(init: str) -> Case:
    return Case(f"init-{init}", edited(peft_made(), init_lora_weights=init),
                refused=("INVALID_ARGUMENT", f"init_lora_weights={init!r}"))


CONVERT = "path_initial_model_for_weight_conversion"
REFUSED = [
    Case("pissa-unconverted", base_changing("pissa", converted=False),
         refused=("INVALID_ARGUMENT", "init_lora_weights='pissa' changes the base", CONVERT)),
    Case("olora-unconverted", base_changing("olora", converted=False),
         refused=("INVALID_ARGUMENT", "init_lora_weights='olora' changes the base", CONVERT)),
    Case("pissa-niter-unconverted", base_changing("pissa_niter_2", converted=False),
         refused=("INVALID_ARGUMENT", "init_lora_weights='pissa_niter_2'", CONVERT)),
    *(_refused_init(init) for init in ("corda", "astra", "lora_ga", "loftq")),
    Case("dora", peft_made(use_dora=True), refused=("INVALID_ARGUMENT", "use_dora")),
    Case("lora-bias", peft_made(lora_bias=True), refused=("INVALID_ARGUMENT", "lora_bias")),
    Case("bias-all", peft_made(bias="all"), refused=("INVALID_ARGUMENT", "bias 'all'")),
    Case("modules-to-save", peft_made(modules_to_save=["lm_head"]),
         refused=("INVALID_ARGUMENT", "modules_to_save")),
    Case("trainable-tokens", peft_made(trainable_token_indices=[3, 4]),
         refused=("INVALID_ARGUMENT", "trainable_token_indices")),
    Case("layer-replication", peft_made(layer_replication=[[0, 2], [1, 2]]),
         refused=("INVALID_ARGUMENT", "layer_replication")),
    Case("activated-lora", peft_made(alora_invocation_tokens=[5, 6]),
         refused=("INVALID_ARGUMENT", "alora_invocation_tokens")),
    Case("target-parameters", edited(peft_made(), target_parameters=["mlp.up_proj.weight"]),
         refused=("INVALID_ARGUMENT", "target_parameters")),
    Case("megatron", edited(peft_made(), megatron_config={"tensor_model_parallel_size": 2}),
         refused=("INVALID_ARGUMENT", "megatron_config")),
    Case("qalora", edited(peft_made(), use_qalora=True),
         refused=("INVALID_ARGUMENT", "use_qalora")),
    Case("unknown-variant", edited(peft_made(), use_hyperlora=True),
         refused=("INVALID_ARGUMENT", "use_hyperlora=True")),
    Case("resized-vocabulary", resized_vocabulary,
         refused=("INVALID_ARGUMENT", "lm_head.weight", "vocabulary was resized")),
    *(Case(field_name.replace("_", "-"), edited(peft_made(), **{field_name: {"on": 1}}),
           refused=("INVALID_ARGUMENT", field_name))
      for field_name in ("use_bdlora", "arrow_config", "kasa_config", "monteclora_config")),
    Case("one-weight-twice", one_weight_twice,
         refused=("INVALID_ARGUMENT", "are the same weight", "in two layouts")),
    Case("two-adapter-names", two_adapters_in_one_file,
         refused=("INVALID_ARGUMENT", "belongs to adapter 'second'", "'first'")),
    Case("unknown-key", rekeyed(lambda k: k.replace("lora_A", "lora_X")),
         refused=("INVALID_ARGUMENT", "lora_X", "does not parse")),
    Case("another-base-shapes", another_base,
         refused=("FAILED_PRECONDITION", "has shape [2, 32]", "needs [2, 64]")),
]


@dataclass
class Compat:
    env: Env
    store: ContentStore
    staged: dict = field(default_factory=dict)
    """Case name -> StagedAdapter (accepted) or AdapterError (refused)."""


@pytest.fixture(scope="module")
def compat(tmp_path_factory) -> Compat:
    root = str(tmp_path_factory.mktemp("peft-compat"))
    trained_from = make_tiny_llama(os.path.join(root, "data", "models", "llama-finetune-base"),
                                   num_kv_heads=2, seed=5)
    served = shutil.copytree(trained_from, os.path.join(root, "served-llama"))
    env = Env(trained_from, served, root)
    model = model_config_from_folder(served)
    out = Compat(env, ContentStore(os.path.join(root, "store"), model, model.name, MAX_RANK))
    for case in ACCEPTED + REFUSED:
        path = case.make(env, os.path.join(root, "adapters", case.name))
        try:
            out.staged[case.name] = out.store.stage_path(case.name, path)
        except AdapterError as e:
            out.staged[case.name] = e
    return out


def load_oracle(env: Env, case: Case, path: str):
    """The PEFT model that applies this case's adapter, on the original base weights."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(env.trained_from, dtype=torch.float32)
    if case.oracle == "transformers":
        _quiet(base.load_adapter, path, adapter_name=case.adapter_name)
        return base.eval()
    return _quiet(PeftModel.from_pretrained, base, path, adapter_name=case.adapter_name).eval()


def greedy(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def engine_tokens(compat) -> dict[tuple[str, int], list[int]]:
    """(case, prompt index) -> the engine's greedy tokens, every accepted case's requests in
    one engine, in mixed batches."""
    model = model_config_from_folder(compat.env.served)
    engine = Engine(EngineConfig(
        model=model, pool=PoolConfig(num_pages=2048, max_adapter_slots=8,
                                     max_lora_rank=MAX_RANK),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=128,
                                  max_model_len=64)), compat.env.served)
    reqs = []
    for case in ACCEPTED:
        staged = compat.staged[case.name]
        if isinstance(staged, AdapterError):
            continue  # test_accepted_adapter_gives_peft_tokens reports it
        engine.add_adapter(case.name, staged.folder)
        reqs += [(case.name, i) for i in range(len(PROMPTS))]
    sampling = SamplingParams(max_new_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = engine.generate([PROMPTS[i] for _, i in reqs], sampling,
                              [name for name, _ in reqs])
    return dict(zip(reqs, outputs))


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.name for c in ACCEPTED])
def test_accepted_adapter_gives_peft_tokens(case, compat, engine_tokens):
    """Registration accepts it, and each prompt's greedy tokens through the engine are those
    of the PEFT loader that applies it."""
    staged = compat.staged[case.name]
    assert not isinstance(staged, AdapterError), f"{case.name}: refused: {staged}"
    oracle = load_oracle(compat.env, case, os.path.join(compat.env.root, "adapters", case.name))
    for i, prompt in enumerate(PROMPTS):
        want = greedy(oracle, prompt, NUM_NEW_TOKENS)
        got = engine_tokens[(case.name, i)]
        assert got == want, f"{case.name}, prompt {prompt}: slora {got} != PEFT {want}"


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_refused_adapter_gets_its_status_naming_the_field(case, compat):
    """Registration refuses it with the status the frontend answers and a message naming
    the adapter's field or key, and the user's folder."""
    err = compat.staged[case.name]
    assert isinstance(err, AdapterError), f"{case.name}: accepted, expected a refusal"
    code, *words = case.refused
    assert err.grpc_code == code, f"{case.name}: {err.grpc_code}: {err}"
    for w in words:
        assert w in str(err), f"{case.name}: {w!r} not in {err}"
    assert os.path.join(compat.env.root, "adapters", case.name) in str(err)


def test_local_base_folder_is_accepted_with_a_warning(compat):
    """PEFT wrote the trainer's local folder as base_model_name_or_path: the name is not the
    served model's, so registration warns, naming both."""
    warning = compat.staged["local-base-folder"].warning
    assert compat.env.trained_from in warning and "'served-llama'" in warning, warning


def test_strict_base_model_refuses_the_local_base_folder(compat, tmp_path):
    """With the operator's strict check the same adapter is FAILED_PRECONDITION, naming the
    folder PEFT wrote and the served model."""
    model = model_config_from_folder(compat.env.served)
    strict = ContentStore(str(tmp_path / "store"), model, model.name, MAX_RANK,
                          strict_base_model=True)
    with pytest.raises(AdapterError) as info:
        strict.stage_path("strict", os.path.join(compat.env.root, "adapters",
                                                 "local-base-folder"))
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    assert compat.env.trained_from in str(info.value) and "'served-llama'" in str(info.value)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_is_the_fine_tuned_model(init, compat, engine_tokens):
    """The converted adapter on the original base gives the tokens of the fine-tuned model
    (PEFT loading the unconverted adapter, which rebuilds its changed base), while the
    unconverted adapter's A and B read as plain LoRA give other tokens: the maths the
    refusal prevents."""
    env = compat.env
    unconverted = os.path.join(env.root, "adapters", f"{init}-unconverted")
    fine_tuned = load_oracle(env, Case(init, None), unconverted)
    naive_dir = edit_adapter_config(
        shutil.copytree(unconverted, os.path.join(env.root, f"{init}-naive")),
        init_lora_weights=True)
    naive = load_oracle(env, Case(init, None), naive_dir)
    num_differ = 0
    for i, prompt in enumerate(PROMPTS):
        want = greedy(fine_tuned, prompt, NUM_NEW_TOKENS)
        assert engine_tokens[(f"{init}-converted", i)] == want, f"{init}, prompt {prompt}"
        num_differ += greedy(naive, prompt, NUM_NEW_TOKENS) != want
    assert num_differ > 0, "serving the unconverted adapter as plain LoRA gave the same tokens"
