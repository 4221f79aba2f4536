"""Hypothesis strategies for the OpenAI HTTP API: requests to every endpoint with fields
that are plausible often enough to reach the model and random JSON the rest of the time
(wrong types, out of range, lone surrogates, oversized), raw bodies that are not JSON, wrong
methods and paths, and good, bad and missing keys and deadlines.

Import from a test as `from helpers_http_strategies import http_request` (pytest puts tests/
on sys.path). `http_request(models, adapter_dir, admin_key)` draws one HttpCall.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from hypothesis import strategies as st

from helpers_strategies import FLOATS, ODD_TEXT, OVERSIZED_TEXT, TEXT, UINT32_MAX, UINT64_MAX

LOAD_NAMES = ["hz-0", "hz-1", "hz/x", "", "..", "a" * 200]
"""Adapter names the HTTP fuzz loads and unloads (never the gRPC fuzz's own)."""
SURROGATE = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udc00"])
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), FLOATS,
                      TEXT, SURROGATE)
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
SMALL_INT = st.one_of(st.integers(-2, 40), st.sampled_from([0, UINT32_MAX, UINT32_MAX + 1,
                                                           UINT64_MAX + 1, -2**63]))


def _or_json(strategy):
    """Mostly `strategy`, sometimes any JSON value."""
    return st.one_of(strategy, strategy, strategy, JSON)


@dataclass
class HttpCall:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    timeout_sent: bool = False


def _sampling_fields() -> dict:
    return {
        "max_tokens": _or_json(SMALL_INT), "temperature": _or_json(st.floats(-1, 3)),
        "top_p": _or_json(st.floats(-0.5, 1.5)), "top_k": _or_json(SMALL_INT),
        "seed": _or_json(st.integers(-5, UINT64_MAX + 5)),
        "stop": _or_json(st.one_of(TEXT, st.lists(TEXT, max_size=20))),
        "stop_token_ids": _or_json(st.lists(st.integers(-3, 400), max_size=4)),
        "ignore_eos": _or_json(st.booleans()), "stream": _or_json(st.booleans()),
        "stream_options": _or_json(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "n": _or_json(st.integers(0, 3)), "presence_penalty": _or_json(st.floats(-1, 1)),
        "logit_bias": JSON, "return_tokens_as_token_ids": _or_json(st.booleans()),
        "user": _or_json(TEXT),
    }


def _prompt():
    return _or_json(st.one_of(
        TEXT, ODD_TEXT, SURROGATE, OVERSIZED_TEXT, st.lists(st.integers(-2, 300), max_size=70),
        st.lists(TEXT, max_size=3), st.lists(st.lists(st.integers(0, 300), max_size=8),
                                             max_size=2)))


def _messages():
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""])},
                                 optional={"text": _or_json(TEXT)})
    message = st.fixed_dictionaries(
        {"role": _or_json(st.sampled_from(["system", "user", "assistant", "developer",
                                           "tool", "wizard"]))},
        optional={"content": _or_json(st.one_of(TEXT, SURROGATE, st.lists(part, max_size=3))),
                  "name": TEXT})
    return _or_json(st.lists(message, max_size=5))


def _body(models: list[str], adapter_dir: str, path: str):
    model = _or_json(st.sampled_from(models + ["nope", "", "admin/nope", "a/b/c"]))
    if path == "/v1/completions":
        return st.fixed_dictionaries({"model": model, "prompt": _prompt()},
                                     optional={**_sampling_fields(),
                                               "logprobs": _or_json(st.integers(-1, 3)),
                                               "echo": st.booleans(), "suffix": TEXT,
                                               "best_of": st.integers(0, 2)})
    if path == "/v1/chat/completions":
        return st.fixed_dictionaries({"model": model, "messages": _messages()},
                                     optional={**_sampling_fields(),
                                               "logprobs": _or_json(st.booleans()),
                                               "top_logprobs": _or_json(st.integers(-1, 3)),
                                               "max_completion_tokens": SMALL_INT,
                                               "tools": JSON, "response_format": JSON})
    name = _or_json(st.sampled_from(LOAD_NAMES))
    if path == "/v1/load_lora_adapter":
        where = _or_json(st.sampled_from([adapter_dir, adapter_dir + "/..", "/etc", "", "x"]))
        return st.fixed_dictionaries({"lora_name": name, "lora_path": where},
                                     optional={"public": st.booleans(),
                                               "shared_with": _or_json(st.lists(TEXT))})
    return st.fixed_dictionaries({"lora_name": name}, optional={"lora_int_id": JSON})


def _plausible_body(models: list[str], path: str):
    """A body with valid values only (the model runs it), streamed or not."""
    common = {"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
              "top_p": st.floats(0.1, 1), "seed": st.integers(0, 2**63 - 1),
              "stop": st.text(min_size=1, max_size=3), "ignore_eos": st.booleans(),
              "top_k": st.integers(-1, 50)}
    stream = st.one_of(st.just({}), st.just({"stream": True}), st.just(
        {"stream": True, "stream_options": {"include_usage": True}}))
    if path == "/v1/completions":
        fields = st.fixed_dictionaries(
            {"model": st.sampled_from(models),
             "prompt": st.one_of(st.text(min_size=1, max_size=30),
                                 st.lists(st.integers(3, 250), min_size=1, max_size=20))},
            optional={**common, "logprobs": st.just(0),
                      "return_tokens_as_token_ids": st.booleans()})
    else:
        message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                         "content": st.text(max_size=20)})
        fields = st.fixed_dictionaries(
            {"model": st.sampled_from(models),
             "messages": st.lists(message, min_size=1, max_size=3)},
            optional={**common, "logprobs": st.booleans()})
    return st.builds(lambda f, s: {**f, **s}, fields, stream)


def _encode(value) -> bytes:
    """JSON as a client would send it (NaN and infinities as Python writes them, lone
    surrogates escaped)."""
    return json.dumps(value, allow_nan=True).encode()


GARBAGE_BODIES = st.one_of(st.binary(max_size=200), st.sampled_from([
    b"", b"{", b"[]", b"null", b'{"model": ', b'{"model": "base", "prompt": "hi"',
    b"\xff\xfe", b'{"model": "base", "prompt": "\\ud800"}', b"1e999999"]))
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)


@st.composite
def http_request(draw, models: list[str], adapter_dir: str, admin_key: str) -> HttpCall:
    path = draw(st.sampled_from([
        "/v1/completions", "/v1/completions", "/v1/completions", "/v1/chat/completions",
        "/v1/chat/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter", "/v1/models", "/v1/models/", "/v1/embeddings", "/",
        "/health"]))
    get = path.startswith("/v1/models") or path in ("/", "/health")
    if path == "/v1/models/":
        path += draw(st.sampled_from(models + ["nope", "a/b", "%2e%2e", "x" * 300]))
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "DELETE"] if get
                                  else ["POST"] * 8 + ["GET", "PUT"]))
    call = HttpCall(method, path)
    if method in ("POST", "PUT"):
        structured = path in ("/v1/completions", "/v1/chat/completions",
                              "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
        generation = path in ("/v1/completions", "/v1/chat/completions")
        kind = draw(st.integers(0, 9))
        if generation and kind >= 5:
            call.body = _encode(draw(_plausible_body(models, path)))
        elif structured and kind > 0:
            call.body = _encode(draw(_body(models, adapter_dir, path)))
        else:
            call.body = draw(GARBAGE_BODIES)
        call.headers["Content-Type"] = draw(st.sampled_from(
            ["application/json"] * 4 + ["text/plain", "application/x-www-form-urlencoded"]))
    auth = draw(st.sampled_from(["good"] * 8 + ["none", "bad", "odd"]))
    if auth != "none":
        call.headers["Authorization"] = {
            "good": f"Bearer {admin_key}", "bad": "Bearer slora_0_0",
            "odd": draw(HEADER_TEXT)}[auth]
    if draw(st.integers(0, 9)) == 0:
        call.headers["x-slora-timeout-s"] = draw(st.one_of(
            st.sampled_from(["0", "-1", "nan", "inf", "1e9", "0.001", "30", ""]), HEADER_TEXT))
        call.timeout_sent = True
    if draw(st.integers(0, 9)) == 0:
        call.headers["x-request-id"] = draw(HEADER_TEXT)
    return call

