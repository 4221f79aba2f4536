"""The OpenAI request bodies slora accepts, as pydantic models (strict types, unknown fields
ignored as OpenAI's own server does), and their translation into the gRPC API's
GenerateRequest. Only shapes and what the protobuf fields can hold are checked here; every
value then goes through the same validation as a gRPC call (SamplingParams, the frontend's
_prepare, the scheduler's admission).

What slora does not do is refused by name rather than ignored: n > 1, best_of, echo,
suffix, penalties, logit_bias, tools, non-text content and response formats, and top
logprobs (each token's own log-probability is returned: completions' `logprobs: 0`,
chat's `logprobs: true`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slora.common.errors import InvalidRequestError
from slora.common.sampling_params import SamplingParams
from slora.protos.convert import sampling_to_proto
from slora.v1 import common_pb2, generation_pb2

UINT32_MAX = 2**32 - 1
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat runs to the end of the context (as vLLM)."""
TYPE_TAGS = ("str", "int", "float", "bool", "none", "list", "dict")


def invalid(param: str, message: str) -> InvalidRequestError:
    err = InvalidRequestError(f"{param}: {message}")
    err.param = param
    return err


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    def refuse_unsupported(self) -> None:
        """Raises InvalidRequestError for a field asking for what slora does not do."""


class StreamOptions(Strict):
    include_usage: bool = False


class CommonBody(Strict):
    """The fields /v1/completions and /v1/chat/completions share (with vLLM's top_k,
    stop_token_ids, ignore_eos and return_tokens_as_token_ids)."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1, le=UINT32_MAX)
    """-1 or 0: no top-k cut."""
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    return_tokens_as_token_ids: bool = False
    user: str | None = None
    """Accepted and unused."""

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise invalid("n", f"{self.n} choices asked for; slora returns one (n = 1)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise invalid(name, f"{getattr(self, name)}: slora applies no penalties; "
                                    "send 0 or leave it out")
        if self.logit_bias:
            raise invalid("logit_bias", "slora applies no logit bias; leave it out")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "only with stream: true")
        if any(not 0 <= t <= UINT32_MAX for t in self.stop_token_ids):
            raise invalid("stop_token_ids", f"{self.stop_token_ids[:8]}: token ids are "
                                            f"integers in [0, {UINT32_MAX}]")

    def sampling(self, max_tokens: int) -> common_pb2.SamplingParams:
        """The request's sampling as the gRPC API's message, validated as SamplingParams."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0),
            top_p=self.top_p, seed=self.seed, stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos)
        return sampling_to_proto(params, stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(CommonBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise invalid("logprobs", f"{self.logprobs} alternatives asked for; slora returns "
                                      "only each sampled token's log-probability (logprobs: 0)")
        if self.echo:
            raise invalid("echo", "slora does not echo the prompt; leave it out")
        if self.suffix is not None:
            raise invalid("suffix", "slora does not insert text; leave it out")
        if self.best_of not in (None, 1):
            raise invalid("best_of", f"{self.best_of}: slora returns one choice (best_of = 1)")


class ContentPart(Strict):
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(Strict):
    type: str


class ChatBody(CommonBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[dict] | None = None
    response_format: ResponseFormat | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs:
            raise invalid("top_logprobs", f"{self.top_logprobs} alternatives asked for; "
                          "slora returns only each sampled token's log-probability")
        if self.tools:
            raise invalid("tools", "slora does not call tools; leave them out")
        if self.response_format is not None and self.response_format.type != "text":
            raise invalid("response_format", f"type {self.response_format.type!r}: slora "
                                             "writes plain text (type 'text')")

    def chat_messages(self) -> list[dict]:
        """The messages as the chat template takes them (text parts joined; OpenAI's
        developer role is the system role of the templates)."""
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise invalid(f"messages[{i}].content[{j}]",
                                      f"type {part.type!r}: slora reads text parts only")
                content = "".join(part.text for part in m.content)
            else:
                content = m.content or ""
            out.append({"role": "system" if m.role == "developer" else m.role,
                        "content": content})
        return out


def parse(body_cls: type[Strict], data: bytes) -> Strict:
    """The body as `body_cls`; InvalidRequestError naming the first field that is wrong."""
    try:
        body = body_cls.model_validate_json(data, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first["loc"]
                        if isinstance(x, int) or not (x in TYPE_TAGS or "[" in x))
        got = "" if first["type"] in ("missing", "json_invalid") else \
            f" (got {first.get('input')!r:.80})"
        raise invalid(param.lstrip(".") or "body", first["msg"] + got) from None
    body.refuse_unsupported()
    return body


def generate_request(body: CommonBody, adapter_id: str, max_model_len: int,
                     request_id: str) -> generation_pb2.GenerateRequest:
    """The gRPC API's request for `body` (its prompt set for a completion; a chat's
    messages go to GenerationService.events beside it)."""
    if isinstance(body, CompletionBody):
        max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        want_logprobs = body.logprobs is not None
    else:
        max_tokens = body.max_completion_tokens or body.max_tokens or max_model_len
        want_logprobs = body.logprobs
    request = generation_pb2.GenerateRequest(
        request_id=request_id, adapter_id=adapter_id, sampling=body.sampling(max_tokens),
        return_logprobs=want_logprobs)
    if isinstance(body, CompletionBody):
        prompt = body.prompt
        if prompt and isinstance(prompt[0], (str, list)) and not isinstance(prompt, str):
            if len(prompt) != 1:
                raise invalid("prompt", f"a list of {len(prompt)} prompts; slora takes one "
                                        "prompt a request")
            prompt = prompt[0]
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            if any(not 0 <= t <= UINT32_MAX for t in prompt):
                raise invalid("prompt", f"token ids {prompt[:8]}...: integers in "
                                        f"[0, {UINT32_MAX}]")
            request.prompt_token_ids.ids.extend(prompt)
    return request
