"""What a request must satisfy to enter the queue. Each refusal names the value and the
limit; nothing here changes state."""
from __future__ import annotations

from slora.common.config import EngineConfig
from slora.common.errors import InvalidRequestError, QueueFullError
from slora.common.sampling_params import SamplingParams


def check_request(config: EngineConfig, prompt_token_ids: list[int],
                  sampling: SamplingParams, num_waiting: int) -> None:
    if num_waiting >= config.scheduler.max_queue_len:
        raise QueueFullError(
            f"queue full: {num_waiting} requests waiting, limit "
            f"{config.scheduler.max_queue_len}; retry later")
    if not isinstance(sampling, SamplingParams):
        raise InvalidRequestError(f"sampling must be SamplingParams, got {type(sampling)}")
    if len(prompt_token_ids) == 0:
        raise InvalidRequestError("prompt is empty: at least one token is needed")
    check_prompt(prompt_token_ids, sampling, config.scheduler.max_model_len,
                 config.model.vocab_size)


def check_prompt(prompt_token_ids: list[int], sampling: SamplingParams, max_model_len: int,
                 vocab_size: int) -> None:
    """The prompt fits the context, max_new_tokens could, and the prompt and the stop tokens
    fit the vocabulary. The frontend runs it too, before a round trip to the scheduler."""
    if len(prompt_token_ids) >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {max_model_len}, "
            f"so a prompt may have at most {max_model_len - 1}")
    bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")
    sampling.check_vocab(vocab_size)
    if sampling.max_new_tokens > max_model_len:
        # More than any prompt leaves room for. Up to max_model_len is served, ending with
        # "length" where the context does (the HTTP API's chat default asks for exactly it).
        raise InvalidRequestError(
            f"max_new_tokens {sampling.max_new_tokens} exceeds this model's context, "
            f"max_model_len {max_model_len} tokens of prompt and output together (the "
            f"worker's --max-model-len); with this {len(prompt_token_ids)}-token prompt at "
            f"most {max_model_len - len(prompt_token_ids)} new tokens fit")
