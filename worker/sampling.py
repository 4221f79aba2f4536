"""Sampling: greedy, temperature, top-k, top-p; a seeded request draws from a generator
keyed by (seed, output index) alone, so its tokens never depend on the rest of the batch
nor on a preemption. The logprob reported is the chosen token's under the model's own
distribution (before temperature and cuts).

Sampling is total: no parameter value the API accepts, and no logits row (inf, NaN), makes
it raise. On CUDA an invalid distribution given to `torch.multinomial` is a device-side
assert that poisons the whole context, so every row is made a valid distribution first:
* NaN logits count as -inf; a row with +inf logits samples among those alone; a row that
  allows no token at all (all -inf or NaN) samples uniformly;
* the row's maximum is subtracted before dividing by the temperature (at least
  MIN_TEMPERATURE), so a temperature of 1e-300 gives -inf for every other token and 0 for
  the best (greedy, ties drawn evenly) instead of inf / inf;
* the most likely token always survives the top-p cut, whatever top_p (a top_p that rounds
  to 0.0 in float32 keeps exactly that token).
`sample` still catches what raises on one row and reports it for that request
alone (worker/executor.py fails only that request)."""
from __future__ import annotations

import torch

from slora.common.sampling_params import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15


def _request_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    mixed = (seed * _SEED_MIX + output_index) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


FLOAT32_MAX = torch.finfo(torch.float32).max
MIN_TEMPERATURE = 1e-30
"""Temperatures below it divide as it does: a float32 scalar smaller than 1e-38 rounds to
0 (and 0 / 0 is NaN), while at 1e-30 every logit gap a float32 row can hold (its spacing
near 30 is 2e-6) is already far past exp's range: sampling is greedy either way."""


def _stable_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [vocab] -> float32 logits of (nearly) the same distribution, max 0, no NaN:
    NaN and -inf become float32's lowest value, +inf its highest, so a row with +inf
    entries keeps only those (the rest fall to -inf here) and a row of nothing but -inf or
    NaN becomes uniform. Few launches, no host sync (a step samples many rows)."""
    logits = torch.nan_to_num(logits.float(), nan=-FLOAT32_MAX, posinf=FLOAT32_MAX,
                              neginf=-FLOAT32_MAX)
    return logits - logits.max()


def _filtered_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits [vocab] -> float32 probabilities after temperature, top-k and top-p: a
    valid distribution for any row, finite or not (the best token always has mass)."""
    logits = _stable_logits(logits) / max(sp.temperature, MIN_TEMPERATURE)
    if 0 < sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # the best token's logit is 0: the sum is at least 1
    if sp.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays
        # (a top_p of 1e-46 is 0.0 in float32: it would drop them all).
        drop = (cum - sorted_probs) >= sp.top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int],
           generator: torch.Generator | None = None
           ) -> tuple[list[int], list[float], dict[int, str]]:
    """logits [num_reqs, vocab] float32 -> (token ids, logprobs, {row: error}), plain
    lists. A row in the error map has no token (its entries are placeholders)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)
    errors: dict[int, str] = {}
    for i, sp in enumerate(params):
        if sp.greedy:
            continue
        try:
            gen = (generator if sp.seed is None
                   else _request_generator(sp.seed, output_indices[i], logits.device))
            tokens[i] = torch.multinomial(_filtered_probs(logits[i], sp), 1, generator=gen)[0]
        except Exception as e:  # belongs to this request alone
            errors[i] = (f"sampling failed (temperature={sp.temperature!r}, top_k={sp.top_k}, "
                         f"top_p={sp.top_p!r}): {type(e).__name__}: {e}")
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen.tolist(), errors
