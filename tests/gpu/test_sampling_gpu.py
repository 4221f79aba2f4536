"""Sampling on CUDA with every extreme parameter the API accepts and logits rows with NaN
and infinities. On CUDA an invalid distribution given to torch.multinomial is a device-side
assert that poisons the whole context (every later launch fails), so this runs the whole
grid in one process and checks the device still works at the end. Marked `gpu`; skipped
without CUDA."""
from __future__ import annotations

import pytest
import torch

from helpers_gpu import GPU_ONLY
from slora.common.sampling_params import SamplingParams
from slora.worker.sampling import sample

pytestmark = GPU_ONLY

VOCAB = 32000
SPECIAL = {"nan": float("nan"), "posinf": float("inf"), "neginf": float("-inf")}


def rows(gen: torch.Generator) -> torch.Tensor:
    """[8, VOCAB] float32 logits: normal, with a NaN, with two +inf, half -inf, all -inf,
    all NaN, float32 extremes, all equal."""
    x = torch.randn(8, VOCAB, device="cuda", generator=gen) * 4
    x[1, 7] = SPECIAL["nan"]
    x[2, [3, 9]] = SPECIAL["posinf"]
    x[3, ::2] = SPECIAL["neginf"]
    x[4] = SPECIAL["neginf"]
    x[5] = SPECIAL["nan"]
    x[6, :100] = 3e38
    x[7] = 1.0
    return x


@pytest.mark.parametrize("top_k", [0, 1, 50, 2**32 - 1])
def test_extreme_sampling_on_cuda_never_asserts(gen, top_k):
    """7 temperatures x 5 top_p (each with and without a seed) over the 8 rows: every token
    is in the vocabulary, rows with +inf pick one of them, and the device still works."""
    logits = rows(gen)
    for temperature in [5e-324, 1e-300, 1e-39, 1e-30, 1e-6, 1.0, 100.0]:
        for top_p in [5e-324, 1e-46, 1e-30, 0.5, 1.0]:
            for seed in (None, 2**63 - 1):
                sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed)
                token_ids, _, errors = sample(logits, [sp] * 8, list(range(8)), gen)
                assert errors == {} and all(0 <= t < VOCAB for t in token_ids), token_ids
                assert token_ids[2] in (3, 9), (temperature, top_p, token_ids)
    torch.cuda.synchronize()
    assert torch.ones(4, device="cuda").sum().item() == 4.0
