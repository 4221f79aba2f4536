"""The torch reference of paged attention (kernels/torch_ref.py), which the CUDA kernels are
tested against on the GPU, sees exactly the key positions Hugging Face's own Mistral sees
under its sliding window, and serves a context in prefill chunks and decode steps as one
whole prefill does (chunks crossing the window's edge included)."""
from __future__ import annotations

import pytest
import torch

from slora.kernels import torch_ref
from slora.kernels.backend import NO_WINDOW

SEQ_LEN = 24
HEAD_DIM = 32  # >= SEQ_LEN: each position gets its own one-hot value vector below


def hf_mistral_visible_keys(window: int | None) -> torch.Tensor:
    """[SEQ_LEN, SEQ_LEN] bool: which keys each query's attention weights are non-zero on,
    in a tiny transformers MistralForCausalLM with this sliding window (None: none)."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=HEAD_DIM, sliding_window=window,
                           max_position_embeddings=128, attn_implementation="eager")
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, SEQ_LEN))
    with torch.no_grad():
        attn = model(ids, output_attentions=True).attentions[0]  # [1, heads, q, k]
    return (attn[0] > 0).all(dim=0)


def reference_visible_keys(window: int) -> torch.Tensor:
    """The same from torch_ref.paged_attention: with q = 0 every visible key weighs the same,
    and with position j's value the one-hot e_j the output row is non-zero exactly on the
    visible positions."""
    pool = torch.zeros(SEQ_LEN, 2, HEAD_DIM)
    pool[:, 1, :SEQ_LEN] = torch.eye(SEQ_LEN)
    page_table = torch.randperm(SEQ_LEN, dtype=torch.int32)  # any page order
    pool = pool[torch.argsort(page_table)]  # position j's K/V on page page_table[j]
    out = torch_ref.paged_attention(
        torch.zeros(SEQ_LEN, 1, HEAD_DIM), pool, page_table[None], torch.tensor([SEQ_LEN]),
        torch.tensor([0, SEQ_LEN]), 1, 1.0, sliding_window=window)
    return out[:, 0, :SEQ_LEN] > 0


@pytest.mark.parametrize("window", [1, 2, 5, 16, SEQ_LEN, 100])
def test_reference_sees_the_keys_hf_mistral_sees(window):
    """Query p sees keys p - W < j <= p, as transformers' Mistral (eager attention) does."""
    theirs = hf_mistral_visible_keys(window)
    ours = reference_visible_keys(window)
    assert torch.equal(ours, theirs), (
        f"window {window}: query rows where the visible keys differ: "
        f"{(ours != theirs).any(dim=1).nonzero().flatten().tolist()}")
    p, j = torch.meshgrid(torch.arange(SEQ_LEN), torch.arange(SEQ_LEN), indexing="ij")
    assert torch.equal(ours, (j <= p) & (j > p - window))


def test_no_window_is_causal_as_hf_mistral_without_one():
    """NO_WINDOW (0) sees every earlier position, as Mistral with sliding_window=None."""
    assert torch.equal(reference_visible_keys(NO_WINDOW), hf_mistral_visible_keys(None))


@pytest.mark.parametrize("window", [NO_WINDOW, 7, 16])
def test_chunked_prefill_and_decode_match_one_prefill(window):
    """A 40-token context served as prefill chunks of 13, 9 and 11 tokens (each crossing the
    window's edge) and then 7 decode steps gives the rows of one 40-token prefill, GQA with 4
    query heads per KV head."""
    gen = torch.Generator().manual_seed(3)
    ctx, num_heads, num_kv_heads, head_dim = 40, 8, 2, 16
    pool = torch.randn(ctx + 5, 2, num_kv_heads * head_dim, generator=gen)
    page_table = torch.randperm(ctx + 5, generator=gen, dtype=torch.int32)[:ctx][None]
    q = torch.randn(ctx, num_heads, head_dim, generator=gen)
    whole = torch_ref.paged_attention(q, pool, page_table, torch.tensor([ctx]),
                                      torch.tensor([0, ctx]), num_kv_heads, 0.25,
                                      sliding_window=window)
    start = 0
    for end in (13, 22, 33):
        chunk = torch_ref.paged_attention(q[start:end], pool, page_table, torch.tensor([end]),
                                          torch.tensor([0, end - start]), num_kv_heads, 0.25,
                                          sliding_window=window)
        torch.testing.assert_close(chunk, whole[start:end], rtol=1e-5, atol=1e-6)
        start = end
    for end in range(34, ctx + 1):
        step = torch_ref.paged_attention_decode(q[end - 1:end], pool, page_table,
                                                torch.tensor([end]), num_kv_heads, 0.25,
                                                sliding_window=window)
        torch.testing.assert_close(step, whole[end - 1:end], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "4096"])
def test_a_bad_window_is_refused_by_value(bad):
    """A window that is not an int >= 0 is a ValueError naming it, before any work."""
    with pytest.raises(ValueError, match=f"sliding_window must be an int >= 0.*{bad!r}"):
        torch_ref.paged_attention(torch.zeros(1, 1, 8), torch.zeros(1, 2, 8),
                                  torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]),
                                  torch.tensor([0, 1]), 1, 1.0, sliding_window=bad)


def test_a_numpy_int_window_is_an_int_window():
    """A window read off a config as a numpy integer serves as the same Python int."""
    import numpy as np
    assert torch.equal(reference_visible_keys(np.int64(5)), reference_visible_keys(5))
