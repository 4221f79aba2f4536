"""Sampling through the Engine: seeds independent of the batch, cuts, stops, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from slora.common.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.common.sampling_params import SamplingParams
from slora.engine.engine import Engine
from slora.models.registry import dummy_model_config
from slora.worker.sampling import _filtered_probs, sample


def make_engine(num_pages: int = 2048, max_num_seqs: int = 16) -> Engine:
    return Engine(EngineConfig(
        model=dummy_model_config("dummy-tiny"),
        pool=PoolConfig(num_pages=num_pages, max_adapter_slots=2, max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                                  max_model_len=128), seed=11))


def run(engine: Engine, reqs) -> dict[str, list]:
    outs = {}
    for req_id, prompt, sp in reqs:
        engine.submit(prompt, sp, req_id=req_id)
        outs[req_id] = []
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.req_id].append(out)
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_seeded_request_gives_same_tokens_alone_and_in_a_batch():
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=1234,
                        ignore_eos=True)
    alone = tokens(run(make_engine(), [("x", [3, 4, 5], sp)])["x"])
    others = [(f"o{i}", [9 + i] * (i + 1), SamplingParams(max_new_tokens=10, temperature=1.0,
                                                           ignore_eos=True)) for i in range(6)]
    batched = tokens(run(make_engine(), others[:3] + [("x", [3, 4, 5], sp)] + others[3:])["x"])
    assert alone == batched
    other_seed = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=99,
                                ignore_eos=True)
    assert tokens(run(make_engine(), [("x", [3, 4, 5], other_seed)])["x"]) != alone


def test_seeded_request_survives_preemption_unchanged():
    """A pool so small that requests are preempted and recomputed gives the same tokens."""
    sp = SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
    reqs = [(f"r{i}", [5 + i] * 30, sp) for i in range(8)]
    big = run(make_engine(), reqs)
    small_engine = make_engine(num_pages=232, max_num_seqs=8)  # 104 pages of adapters allowed
    small = run(small_engine, reqs)
    assert small_engine.scheduler.num_preemptions > 0
    assert {k: tokens(v) for k, v in small.items()} == {k: tokens(v) for k, v in big.items()}


def test_top_k_one_is_greedy_and_logprobs_are_the_models():
    greedy = run(make_engine(), [("g", [1, 2, 3], SamplingParams(max_new_tokens=8,
                                                                  ignore_eos=True))])["g"]
    topk1 = run(make_engine(), [("g", [1, 2, 3], SamplingParams(
        max_new_tokens=8, temperature=2.0, top_k=1, ignore_eos=True))])["g"]
    assert tokens(greedy) == tokens(topk1)
    assert all(lp <= 0.0 and math.isfinite(lp) for o in greedy for lp in o.new_logprobs)


def test_stop_token_and_length_finish_reasons():
    first = tokens(run(make_engine(), [("a", [1, 2, 3], SamplingParams(
        max_new_tokens=5, ignore_eos=True))])["a"])
    stop_at = first[2]
    outs = run(make_engine(), [("a", [1, 2, 3], SamplingParams(
        max_new_tokens=5, stop_token_ids=[stop_at], ignore_eos=True))])["a"]
    assert tokens(outs) == first[:first.index(stop_at) + 1]
    assert outs[-1].finished and outs[-1].finish_reason.value == "stop"
    outs = run(make_engine(), [("b", [1, 2, 3], SamplingParams(max_new_tokens=5,
                                                                ignore_eos=True))])["b"]
    assert outs[-1].finish_reason.value == "length" and len(tokens(outs)) == 5


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.7, 2), (0.95, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    logits = torch.tensor([0.6, 0.2, 0.15, 0.05]).log()
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert int((probs > 0).sum()) == kept
    assert probs.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-30, 5e-324])
def test_a_tiny_temperature_samples_the_top_token_instead_of_failing_the_step(temperature):
    """A temperature so small that logits / temperature overflows float32 (the HTTP fuzz
    found 1e-300 failing the whole step, every request of it): the request samples the most
    likely token, and the others in the batch are unaffected."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3)) * 5
    tokens, _, errors = sample(logits, [SamplingParams(temperature=temperature, seed=1),
                                SamplingParams()], [0, 0])
    assert errors == {} and tokens == logits.argmax(dim=-1).tolist()


ROWS = {
    "finite": [2.0, 1.0, 0.5, -3.0],
    "nan": [float("nan"), 1.0, 3.0, 0.0],
    "posinf": [1.0, float("inf"), 0.0, float("inf")],
    "neginf": [float("-inf"), 1.0, float("-inf"), 0.0],
    "all_neginf": [float("-inf")] * 4,
    "all_nan": [float("nan")] * 4,
    "huge": [3e38, -3e38, 3e38, 0.0],
}


@pytest.mark.parametrize("row", sorted(ROWS))
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-39, 1e-30, 1e-6, 1.0, 100.0])
@pytest.mark.parametrize("top_p", [5e-324, 1e-46, 1e-30, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 3, 2**32 - 1])
def test_every_accepted_parameter_and_any_logits_give_a_distribution(row, temperature, top_p,
                                                                      top_k):
    """Any temperature in (0, 100], top_p in (0, 1] and top_k the API accepts, on logits
    with NaN, +inf, -inf or float32 extremes: probabilities are finite, non-negative, sum
    to 1, and `sample` draws a token without raising."""
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=3)
    logits = torch.tensor(ROWS[row], dtype=torch.float32)
    probs = _filtered_probs(logits, sp)
    assert torch.isfinite(probs).all() and (probs >= 0).all(), probs
    assert probs.sum().item() == pytest.approx(1.0), probs
    token_ids, logprobs, errors = sample(logits.unsqueeze(0), [sp], [0])
    assert errors == {} and 0 <= token_ids[0] < 4
    if row == "finite" and (temperature <= 1e-6 or top_p <= 1e-30 or top_k == 1):
        assert token_ids == [0]  # greedy-equivalent
    if row == "posinf":
        assert token_ids[0] in (1, 3)


def test_batched_sampling_draws_each_rows_own_distribution():
    """130 sampled rows (three chunks) of one 6-token distribution, cut differently per row
    group: over 40 draws each, every token drawn lies inside its row's cut, and the plain
    rows' frequencies follow the probabilities (within 4 standard deviations)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(130, 1)
    params = ([SamplingParams(temperature=1.0)] * 50
              + [SamplingParams(temperature=1.0, top_k=2)] * 40
              + [SamplingParams(temperature=1.0, top_p=0.7)] * 40)
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(6)
    for draw in range(40):
        token_ids, _, errors = sample(logits, params, [draw] * 130, gen)
        assert errors == {}
        assert all(t < 2 for t in token_ids[50:90])  # top_k 2
        assert all(t < 3 for t in token_ids[90:])  # top_p 0.7 keeps 0.4 + 0.25 + 0.15
        counts += torch.bincount(torch.tensor(token_ids[:50]), minlength=6).float()
    n = counts.sum()
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 4 * sd).all(), (counts / n, probs)


def test_a_seeded_row_draws_the_same_token_wherever_it_sits_in_the_batch():
    """The same seeded request at row 0 of one row and at row 100 of 150 (another chunk,
    beside other seeds and unseeded rows) draws the same tokens, at every output index."""
    logits = torch.randn(150, 40, generator=torch.Generator().manual_seed(9))
    target = SamplingParams(temperature=0.8, top_p=0.9, seed=4242)
    others = [SamplingParams(temperature=1.0, seed=s if s % 2 else None) for s in range(150)]
    for index in range(20):
        alone, _, _ = sample(logits[100:101], [target], [index])
        params = others[:100] + [target] + others[101:]
        batched, _, _ = sample(logits, params, [index] * 150)
        assert batched[100] == alone[0], index


def test_seeded_uniforms_spread_over_zero_to_one():
    from slora.worker.sampling import seeded_uniform

    u = torch.tensor([seeded_uniform(seed, i) for seed in range(50) for i in range(200)])
    assert (u >= 0).all() and (u < 1).all()
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - 1000).abs().max() < 150, hist  # 10,000 values over 10 bins
