"""The gRPC API's GenerateEvents as OpenAI response bodies and stream chunks: `text_completion`
for /v1/completions, `chat.completion` and `chat.completion.chunk` for chat. The last chunk
of a stream carries the finish reason; with `stream_options.include_usage` every chunk has
`usage: null` and one more chunk, with no choices, carries the usage, as OpenAI sends it."""
from __future__ import annotations

import time

from slora.v1 import common_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}
MIN_LOGPROB = -9999.0
"""What a log-probability of -inf reads as (JSON has no infinity; OpenAI's floor)."""


class Output:
    """One response: its id, model and creation time, and how its choices read."""

    def __init__(self, chat: bool, model: str, request_id: str, tokenizer, *,
                 include_usage: bool = False, token_ids_as_text: bool = False):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.include_usage = include_usage
        self.token_ids_as_text = token_ids_as_text
        self.num_chars = 0
        """Characters of token text so far (completions' text_offset)."""

    # -- pieces -----------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        if self.token_ids_as_text:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def _logprob_entries(self, event) -> list[tuple[str, float]]:
        return [(self._token_text(t), max(float(lp), MIN_LOGPROB))
                for t, lp in zip(event.token_ids, event.logprobs)]

    def _logprobs(self, entries: list[tuple[str, float]]) -> dict:
        if self.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                 "top_logprobs": []} for t, lp in entries]}
        offsets = []
        for t, _ in entries:
            offsets.append(self.num_chars)
            self.num_chars += len(t)
        return {"tokens": [t for t, _ in entries], "token_logprobs": [lp for _, lp in entries],
                "top_logprobs": None, "text_offset": offsets}

    @staticmethod
    def usage(event) -> dict:
        prompt, completion = event.usage.prompt_tokens, event.usage.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    # -- whole responses and chunks ---------------------------------------------------------

    def body(self, events: list) -> dict:
        """The non-streamed response of all of a request's events."""
        text = "".join(e.text for e in events)
        entries = [x for e in events for x in self._logprob_entries(e)]
        logprobs = self._logprobs(entries) if any(e.logprobs for e in events) else None
        last = events[-1]
        choice = {"index": 0, "logprobs": logprobs,
                  "finish_reason": FINISH_REASONS.get(last.finish_reason)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out = self._envelope(self.object, [choice])
        out["usage"] = self.usage(last)
        return out

    def first_chunks(self) -> list[dict]:
        """What a stream opens with: chat's assistant role."""
        if not self.chat:
            return []
        return [self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})]

    def chunks(self, event) -> list[dict]:
        """The chunks of one event: none when it adds nothing a client sees (text held back
        for a whole character), then the usage chunk after the last one if asked for."""
        finish = FINISH_REASONS.get(event.finish_reason)
        if not (event.text or event.logprobs or finish):
            return []
        logprobs = self._logprobs(self._logprob_entries(event)) if event.logprobs else None
        choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        if self.chat:
            choice["delta"] = {"content": event.text} if event.text or not finish else {}
        else:
            choice["text"] = event.text
        out = [self._chunk(choice)]
        if finish and self.include_usage:
            usage = self._envelope(out[0]["object"], [])
            usage["usage"] = self.usage(event)
            out.append(usage)
        return out

    def _chunk(self, choice: dict) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion",
                             [choice])
        if self.include_usage:
            out["usage"] = None
        return out
