"""What a step costs, from what it contains: an online least-squares fit of the worker's
step time on the step's prefill tokens and decode tokens, with exponential decay.

Why a model and not an average. A step's time grows with its work: one 2,000-token prompt
takes as long as many decode steps. An average of whole steps, whatever their size, is
poisoned by one large prefill (a 98 ms decode step "became" 1.6 s) and then an idle server
refuses requests it could serve in a fraction of their deadline. So each step is one
sample (x, y): x = (1, prefill tokens / PREFILL_UNIT, decode tokens / DECODE_UNIT), y = the
step's seconds as the driver sees it (result received minus the later of command sent and
the previous result, so two commands in flight are not counted twice), and the model is

    seconds(step) = c0 + c1 * prefill_tokens / PREFILL_UNIT + c2 * decode_tokens / DECODE_UNIT

with c >= 0, fitted by least squares over all samples so far, each weighted DECAY^age (the
last ~1 / (1 - DECAY) steps count), with a small ridge that, among fits equally good,
prefers the smallest coefficients. The units set which coefficient takes the blame while
the samples cannot tell them apart: with only decode steps of one size, the intercept
takes most of their time (a bigger batch is then predicted to cost about the same, not
proportionally more); with only one large prefill, the prefill coefficient does (a decode
step is then predicted to cost little). More varied steps separate them.

Written by hand: three unknowns and non-negativity need ~40 lines, and the libraries that
do recursive least squares (or NNLS) would bring numpy arrays into the scheduler's hot
path for a 3x3 system.
"""
from __future__ import annotations

import itertools

from slora.protos.step import StepCommand

DECAY = 0.9
"""Weight of a sample one step older than another: about the last 10 steps count, so the
fit follows a device that slows down (other load) about as fast as a moving average would."""
PREFILL_UNIT = 32
"""Prefill tokens per unit of the prefill feature."""
DECODE_UNIT = 256
"""Decode tokens per unit of the decode feature."""
RIDGE = 1e-6
"""Penalty on the squared coefficients (in the units above): only breaks ties."""
NUM_FEATURES = 3
SUBSETS = [s for n in range(NUM_FEATURES, 0, -1)
           for s in itertools.combinations(range(NUM_FEATURES), n)]
"""The coefficients a non-negative fit may leave free; the others are 0."""


def step_features(cmd: StepCommand) -> tuple[int, int]:
    """(prefill tokens, decode tokens) of a step: a request scheduled for one token is
    decoding (or finishing its prompt, which costs the same)."""
    counts = [r.num_scheduled_tokens for r in cmd.new_requests] + \
             [r.num_scheduled_tokens for r in cmd.running_requests]
    num_decode = sum(1 for n in counts if n == 1)
    return sum(counts) - num_decode, num_decode


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solves a x = b (a small, square) by Gaussian elimination with partial pivoting;
    None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


class StepCostModel:
    def __init__(self):
        self._gram = [[0.0] * NUM_FEATURES for _ in range(NUM_FEATURES)]
        """Decayed sum of x x^T."""
        self._xty = [0.0] * NUM_FEATURES
        """Decayed sum of x y."""
        self.num_samples = 0
        self._coefs: list[float] | None = None
        """The fit, or None when samples came since it was computed."""

    @property
    def measured(self) -> bool:
        return self.num_samples > 0

    @staticmethod
    def _x(num_prefill: int, num_decode: int) -> list[float]:
        return [1.0, num_prefill / PREFILL_UNIT, num_decode / DECODE_UNIT]

    def add(self, num_prefill: int, num_decode: int, seconds: float) -> None:
        x = self._x(num_prefill, num_decode)
        for i in range(NUM_FEATURES):
            self._xty[i] = DECAY * self._xty[i] + x[i] * seconds
            for j in range(NUM_FEATURES):
                self._gram[i][j] = DECAY * self._gram[i][j] + x[i] * x[j]
        self.num_samples += 1
        self._coefs = None

    def coefficients(self) -> list[float]:
        """(c0, c1, c2) >= 0 minimising the decayed squared error plus the ridge: the best
        of the unconstrained fits on each subset of free coefficients that is >= 0."""
        if self._coefs is not None:
            return self._coefs
        g, b = self._gram, self._xty
        best, best_loss = [0.0] * NUM_FEATURES, 0.0
        for free in SUBSETS:
            a = [[g[i][j] + (RIDGE if i == j else 0.0) for j in free] for i in free]
            sub = _solve(a, [b[i] for i in free])
            if sub is None or min(sub) < 0:
                continue
            c = [0.0] * NUM_FEATURES
            for i, v in zip(free, sub):
                c[i] = v
            loss = sum(c[i] * (g[i][j] + (RIDGE if i == j else 0.0)) * c[j]
                       for i in range(NUM_FEATURES) for j in range(NUM_FEATURES)) \
                - 2 * sum(ci * bi for ci, bi in zip(c, b))
            if loss < best_loss:
                best, best_loss = c, loss
        self._coefs = best
        return best

    def predict(self, num_prefill: int, num_decode: int) -> float:
        """Seconds a step of that content takes; 0.0 before any sample."""
        c, x = self.coefficients(), self._x(num_prefill, num_decode)
        return sum(ci * xi for ci, xi in zip(c, x))

    def prefill_seconds_per_token(self) -> float:
        return self.coefficients()[1] / PREFILL_UNIT
