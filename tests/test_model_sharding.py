"""Each layer of models/ holds its tensor-parallel rank's shard, cut by its weight_loader
from the full checkpoint tensor: q/k/v and gate/up by output rows (K/V heads split, or
copied where there are fewer KV heads than ranks), o and down by input columns, the
embedding and lm_head by vocabulary rows, norms whole. Checked against slices of the
Hugging Face checkpoint of a tiny Qwen2 (q/k/v bias), for 2 and 4 ranks; no collectives
run (the layers are only built and loaded)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers_peft import make_tiny_model
from slora.kernels.torch_backend import TorchBackend
from slora.models.decoder import CausalLM
from slora.models.loader import load_checkpoint
from slora.models.parallel import TensorParallel
from slora.models.registry import family_of, model_config_from_folder


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("tp") / "base"), "qwen2", num_kv_heads=2,
                           seed=1)


def rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The rank's slice of t's rows, split evenly."""
    n = t.shape[0] // size
    return t[rank * n:(rank + 1) * n]


def kv_rows(t: torch.Tensor, rank: int, size: int, num_kv_heads: int) -> torch.Tensor:
    """The rank's K/V heads of a k or v projection: split, or with fewer heads than ranks,
    head rank // (size / num_kv_heads)."""
    if num_kv_heads >= size:
        return rows(t, rank, size)
    head_dim = t.shape[0] // num_kv_heads
    head = rank // (size // num_kv_heads)
    return t[head * head_dim:(head + 1) * head_dim]


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_its_shard_of_every_tensor(qwen2, size):
    cfg = model_config_from_folder(qwen2)
    ckpt = load_file(f"{qwen2}/model.safetensors")
    for rank in range(size):
        model = CausalLM(cfg, TensorParallel(size, rank), TorchBackend())
        load_checkpoint(model, family_of("qwen2"), qwen2)
        attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
        c = lambda n: ckpt[f"model.layers.1.{n}"]  # noqa: E731
        kv = lambda t: kv_rows(t, rank, size, cfg.num_kv_heads)  # noqa: E731
        want_qkv = torch.cat([rows(c("self_attn.q_proj.weight"), rank, size),
                              kv(c("self_attn.k_proj.weight")), kv(c("self_attn.v_proj.weight"))])
        assert torch.equal(attn.qkv_proj.weight, want_qkv), (size, rank)
        want_bias = torch.cat([rows(c("self_attn.q_proj.bias"), rank, size),
                               kv(c("self_attn.k_proj.bias")), kv(c("self_attn.v_proj.bias"))])
        assert torch.equal(attn.qkv_proj.bias, want_bias), (size, rank)
        o = c("self_attn.o_proj.weight")
        assert torch.equal(attn.o_proj.weight, rows(o.T, rank, size).T), (size, rank)
        gate, up = c("mlp.gate_proj.weight"), c("mlp.up_proj.weight")
        assert torch.equal(mlp.gate_up_proj.weight,
                           torch.cat([rows(gate, rank, size), rows(up, rank, size)]))
        down = c("mlp.down_proj.weight")
        assert torch.equal(mlp.down_proj.weight, rows(down.T, rank, size).T)
        assert torch.equal(model.embed_tokens.weight,
                           rows(ckpt["model.embed_tokens.weight"], rank, size))
        assert torch.equal(model.layers[1].input_layernorm.weight, c("input_layernorm.weight"))
