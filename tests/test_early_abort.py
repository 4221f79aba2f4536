"""Early abort models a step's cost by what it contains: one huge prefill does not make an
idle server refuse small requests (real processes), and the fit itself (step_cost.py)
separates prefill, decode and fixed costs."""
from __future__ import annotations

import pytest

from helpers_peft import make_tiny_llama
from helpers_stack import Stack, worker_argv
from slora.client import DeadlineExceededError
from slora.scheduler.step_cost import StepCostModel

BIG_PROMPT = [5 + i % 200 for i in range(2000)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("early-abort")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=43,
                           max_position_embeddings=4096)
    stack = Stack(str(root), base, worker_argv(base, max_model_len=2200, num_pages=8192,
                                               max_num_batched_tokens=2048)).start_all()
    yield stack
    stack.stop_all()


def test_after_long_prompts_an_idle_server_accepts_short_requests_with_deadlines(stack):
    """Three 2,000-token prompts (each one prefill step, ~1 s on a CPU, 500x a decode
    step), then on the idle server: 100-token requests with a 10 s deadline (an average of
    whole steps estimates 100 x ~0.5 s, refuses them, and so never sees the short steps
    that would correct it) and 8-token ones are all served in time."""
    with stack.client(timeout_s=120) as c:
        for _ in range(3):
            c.generate([5, 6, 7], max_new_tokens=8, ignore_eos=True)
        for _ in range(3):
            c.generate(BIG_PROMPT, max_new_tokens=1, ignore_eos=True)
        for max_new in (100, 100, 8, 8, 100):
            try:
                out = c.generate([3, 4, 5, 6, 7, 8, 9, 10], max_new_tokens=max_new,
                                 ignore_eos=True, timeout_s=10)
            except DeadlineExceededError as e:
                pytest.fail(f"a {max_new}-token request on an idle server was refused: {e}")
            assert len(out.token_ids) == max_new


def test_the_cost_model_blames_prefill_for_a_long_prompt_and_decode_for_a_batch():
    """Steps of 10 ms + 0.5 ms a prefill token + 0.1 ms a decode token, as a server sees
    them (decode batches of 1..64, prompts of 8..2000 tokens): the fit predicts any mix
    within 1%. With only decode steps of batch 1 seen, a 2,000-token prompt is never
    blamed on decode steps."""
    def cost(p, d):
        return 0.010 + 0.0005 * p + 0.0001 * d

    model = StepCostModel()
    for i in range(200):
        p, d = (8 << (i % 8)) if i % 3 == 0 else 0, 1 + (i * 7) % 64
        model.add(min(p, 2000), d, cost(min(p, 2000), d))
    for p, d in [(0, 1), (0, 64), (2000, 0), (100, 10), (8, 32)]:
        assert model.predict(p, d) == pytest.approx(cost(p, d), rel=0.01), (p, d)

    model = StepCostModel()
    for _ in range(20):
        model.add(0, 1, 0.098)
    model.add(2000, 0, 1.611)
    assert model.predict(0, 1) == pytest.approx(0.098, rel=0.05)
    assert model.predict(0, 64) < 0.2
    for _ in range(3):
        model.add(0, 1, 0.098)
    assert model.predict(0, 1) == pytest.approx(0.098, rel=0.05)
    assert model.predict(2000, 0) > 1.0
