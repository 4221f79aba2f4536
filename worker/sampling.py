"""Sampling: greedy, temperature, top-k, top-p; a seeded request draws from a number keyed
by (seed, output index) alone, so its tokens never depend on the rest of the batch nor on a
preemption. The logprob reported is the chosen token's under the model's own
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
Rows are sampled in batches, not one at a time: a step of 512 sampled requests takes a few
launches per 64 rows, not a dozen per row. The draw is the inverse of each row's cumulative
distribution at one uniform number: a seeded request's from (seed, output index) by
splitmix64 on the host, the others' from the worker's generator; it needs no torch.multinomial,
and no row can assert on the device. `sample` still catches what raises and reports it for
that request alone (worker/executor.py fails only that request)."""
from __future__ import annotations

import torch

from slora.common.sampling_params import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
ROWS_PER_CHUNK = 64
"""Sampled rows processed together: a few launches for the chunk instead of a dozen per row,
and at most 64 x vocab float32 scratch tensors at once (a 152k vocabulary: 39 MB each)."""


def seeded_uniform(seed: int, output_index: int) -> float:
    """A number in [0, 1) from (seed, output index) alone: splitmix64 of the pair, its top 24
    bits (exact in float32). Host arithmetic: a seeded row costs no generator and no launch."""
    z = (seed * _SEED_MIX + output_index + _SEED_MIX) & _MASK64  # splitmix64's step
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 40) / float(1 << 24)


FLOAT32_MAX = torch.finfo(torch.float32).max
MIN_TEMPERATURE = 1e-30
"""Temperatures below it divide as it does: a float32 scalar smaller than 1e-38 rounds to
0 (and 0 / 0 is NaN), while at 1e-30 every logit gap a float32 row can hold (its spacing
near 30 is 2e-6) is already far past exp's range: sampling is greedy either way."""


def _stable_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] -> float32 logits of (nearly) the same distributions, each row's
    max 0, no NaN: NaN and -inf become float32's lowest value, +inf its highest, so a row
    with +inf entries keeps only those (the rest fall to -inf here) and a row of nothing but
    -inf or NaN becomes uniform."""
    logits = torch.nan_to_num(logits.float(), nan=-FLOAT32_MAX, posinf=FLOAT32_MAX,
                              neginf=-FLOAT32_MAX)
    return logits - logits.max(dim=-1, keepdim=True).values


def _per_row(values: list, like: torch.Tensor):
    """One number per row: a Python number when every row has the same one (broadcast at no
    cost), else a [rows, 1] tensor on `like`'s device."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _rows(rows: list[int], like: torch.Tensor):
    """An index of `rows`: a slice when they are consecutive (a view, no launch), else a
    tensor on `like`'s device."""
    if rows[-1] - rows[0] == len(rows) - 1:
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.int64, device=like.device)


def _filtered_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [rows, vocab] -> float32 probabilities after each row's temperature, top-k and
    top-p: a valid distribution for any row, finite or not (its best token always has
    mass). Parameters the rows share cost no tensor of their own."""
    vocab = logits.shape[1]
    x = _stable_logits(logits)
    x = x / _per_row([max(sp.temperature, MIN_TEMPERATURE) for sp in params], x)
    ks = [sp.top_k if 0 < sp.top_k < vocab else 0 for sp in params]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values
        if all(k == ks[0] for k in ks):
            kth = top[:, ks[0] - 1:ks[0]]
        else:  # rows without a cut keep everything (-inf)
            k = torch.tensor(ks, dtype=torch.int64, device=x.device)[:, None]
            kth = top.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)  # each row's best logit is 0: its sum is at least 1
    cut = [i for i, sp in enumerate(params) if sp.top_p < 1.0]
    if cut:
        rows = _rows(cut, probs)
        sub = probs[rows]
        sorted_probs, order = sub.sort(dim=-1, descending=True)
        cum = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays
        # (a top_p of 1e-46 is 0.0 in float32: it would drop them all).
        drop = (cum - sorted_probs) >= _per_row([params[i].top_p for i in cut], cum)
        drop[:, 0] = False
        kept = torch.zeros_like(sub).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs[rows] = kept / kept.sum(-1, keepdim=True)
    return probs


def _filtered_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """One row: logits [vocab] -> its probabilities (`_filtered_rows`)."""
    return _filtered_rows(logits.unsqueeze(0), [sp])[0]


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [rows, vocab] (each row's sum about 1) and uniforms [rows] in [0, 1) -> a token
    per row by the inverse of its cumulative distribution: the first token whose cumulative
    mass exceeds u x the row's total (kept below the total), which has mass of its own. No
    device-side assert can come of it (torch.multinomial asserts on a bad row)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, total * (1 - 2.0**-23))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int],
                 generator: torch.Generator | None) -> torch.Tensor:
    """Tokens [rows] for sampled (non-greedy) rows: a seeded row's uniform from its (seed,
    output index), the others' from `generator`; then `_draw`."""
    dev = logits.device
    seeded = [i for i, sp in enumerate(params) if sp.seed is not None]
    if len(seeded) == len(params):
        u = torch.tensor([seeded_uniform(sp.seed, i) for sp, i in zip(params, output_indices)],
                         dtype=torch.float32, device=dev)
    else:
        u = torch.rand(len(params), generator=generator, device=dev)
        if seeded:
            u[torch.tensor(seeded, dtype=torch.int64, device=dev)] = torch.tensor(
                [seeded_uniform(params[i].seed, output_indices[i]) for i in seeded],
                dtype=torch.float32, device=dev)
    return _draw(_filtered_rows(logits, params), u)


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int],
           generator: torch.Generator | None = None
           ) -> tuple[list[int], list[float], dict[int, str]]:
    """logits [num_reqs, vocab] float32 -> (token ids, logprobs, {row: error}), plain
    lists. Greedy rows take the argmax; the sampled rows go ROWS_PER_CHUNK at a time through
    one batched pass (`_sample_rows`). A chunk that raises is sampled again row by row, so
    that what fails belongs to its request alone: a row in the error map has no token (its
    entries are placeholders)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)
    errors: dict[int, str] = {}
    rows = [i for i, sp in enumerate(params) if not sp.greedy]
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        chunk = rows[start:start + ROWS_PER_CHUNK]
        try:
            sel = _rows(chunk, logits)
            tokens[sel] = _sample_rows(logits[sel], [params[i] for i in chunk],
                                        [output_indices[i] for i in chunk], generator)
        except Exception:  # find the row it belongs to
            for i in chunk:
                sp = params[i]
                try:
                    tokens[i] = _sample_rows(logits[i:i + 1], [sp], [output_indices[i]],
                                             generator)[0]
                except Exception as e:  # belongs to this request alone
                    errors[i] = (f"sampling failed (temperature={sp.temperature!r}, "
                                 f"top_k={sp.top_k}, top_p={sp.top_p!r}): "
                                 f"{type(e).__name__}: {e}")
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen.tolist(), errors
