"""Sampling: greedy, temperature, top-k, top-p; a seeded request draws from a generator
keyed by (seed, output index) alone, so its tokens never depend on the rest of the batch
nor on a preemption. The logprob reported is the chosen token's under the model's own
distribution (before temperature and cuts)."""
from __future__ import annotations

import torch

from slora.common.sampling_params import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15


def _request_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    mixed = (seed * _SEED_MIX + output_index) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def _filtered_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits [vocab] float32 -> probabilities after temperature, top-k and top-p."""
    # Shifted by the max first (softmax does not change): a tiny temperature then sends the
    # others to -inf, never the top one to inf (inf - inf would make every probability NaN);
    # one below the dtype's smallest normal would round to 0 on the way (0 / 0).
    temperature = max(sp.temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.max()) / temperature
    if 0 < sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sp.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_probs) >= sp.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int],
           generator: torch.Generator | None = None) -> tuple[list[int], list[float]]:
    """logits [num_reqs, vocab] float32 -> (token ids, logprobs), plain lists."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    for i, sp in enumerate(params):
        if sp.greedy:
            continue
        gen = (generator if sp.seed is None
               else _request_generator(sp.seed, output_indices[i], logits.device))
        probs = _filtered_probs(logits[i], sp)
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen.tolist()
