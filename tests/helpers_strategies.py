"""Hypothesis strategies for slora's public messages: every field random, with the values
that break servers weighted in (0, limits and one past them, 2^32-1 and 2^64-1, NaN and
infinities, empty strings, odd unicode, oversized strings and lists), and the valid values
common enough that many requests reach the model.

Import from a test as `from helpers_strategies import public_call` (pytest puts tests/ on
sys.path). `public_call(known_adapter_ids, adapter_dir)` draws one Call: which RPC, and its
request message(s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import strategies as st

from slora.v1 import adapters_pb2, common_pb2, generation_pb2, keys_pb2

UINT32_MAX = 2 ** 32 - 1
UINT64_MAX = 2 ** 64 - 1
MAX_PROMPT_CHARS = 1 << 20
"""frontend/generation.py's limit; one past it must be refused."""

# Unicode without surrogates (protobuf strings are UTF-8), with the odd corners spelled out.
ODD_TEXT = st.sampled_from([
    "", " ", "\x00", "\x00" * 64, "\u200b\u200d\ufeff", "\U0001f600" * 8, "e\u0301" * 16,
    "\u202e\u2066rtl", "\ufffd", "\U0010ffff", "../../../../etc/passwd", "%s%n{0}",
    "a" * 129, "é" * 300, "\n\r\t", "\\", "null", "🏳️‍🌈" * 20,
])
TEXT = st.one_of(st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=200),
                 ODD_TEXT)
OVERSIZED_TEXT = st.builds(lambda char, n: char * n, st.characters(codec="utf-8"),
                           st.sampled_from([MAX_PROMPT_CHARS + 1, 200_000, 5000]))
UINT32 = st.one_of(st.integers(0, 300), st.sampled_from([UINT32_MAX, 2 ** 31, 2 ** 31 - 1]),
                   st.integers(0, UINT32_MAX))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1.0, 1e-300, 1e300, math.nan, math.inf,
                                    -math.inf, 100.0, 100.0001, -1.0]),
                   st.floats(0, 2))
TOKEN_IDS = st.one_of(st.lists(st.integers(0, 255), min_size=1, max_size=40),
                      st.lists(UINT32, max_size=40),
                      st.builds(lambda t, n: [t] * n, st.integers(0, 255),
                                st.sampled_from([63, 64, 10_000, 100_000])))


def sampling_params() -> st.SearchStrategy[common_pb2.SamplingParams]:
    def build(max_new, temperature, top_k, top_p, seed, stop_ids, stop, ignore_eos):
        p = common_pb2.SamplingParams(
            max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_token_ids=stop_ids, stop=stop, ignore_eos=ignore_eos)
        if seed is not None:
            p.seed = seed
        return p

    return st.builds(
        build,
        st.one_of(st.integers(0, 4), st.integers(0, 4), UINT32),  # small ones mostly
        st.one_of(st.just(0.0), FLOATS), st.one_of(st.just(0), UINT32),
        st.one_of(st.just(1.0), FLOATS),
        st.one_of(st.none(), st.integers(0, UINT64_MAX), st.just(UINT64_MAX)),
        st.lists(UINT32, max_size=6),
        st.one_of(st.lists(TEXT, max_size=4), st.lists(st.just("x"), min_size=17, max_size=20),
                  st.lists(st.text(min_size=65, max_size=70), min_size=1, max_size=1)),
        st.booleans())


def generate_request(adapter_ids: list[str]) -> st.SearchStrategy[generation_pb2.GenerateRequest]:
    def build(request_id, prompt, chat, adapter_id, sampling, logprobs):
        req = generation_pb2.GenerateRequest(request_id=request_id, chat=chat,
                                             adapter_id=adapter_id, sampling=sampling,
                                             return_logprobs=logprobs)
        if isinstance(prompt, str):
            req.prompt = prompt
        elif prompt is not None:
            req.prompt_token_ids.ids.extend(prompt)
        return req

    return st.builds(
        build,
        st.one_of(st.just(""), TEXT, st.text(min_size=129, max_size=140)),
        st.one_of(TOKEN_IDS, TOKEN_IDS, TEXT, OVERSIZED_TEXT, st.none()),
        st.booleans(),
        st.one_of(st.just(""), st.sampled_from(adapter_ids), TEXT,
                  st.sampled_from([f"admin/{a}" for a in adapter_ids] + ["/", "a/b/c"])),
        sampling_params(), st.booleans())


def register_request(adapter_dir: str) -> st.SearchStrategy[adapters_pb2.RegisterAdapterRequest]:
    path = st.one_of(TEXT, st.sampled_from([
        adapter_dir, adapter_dir + "/", adapter_dir + "/../" + adapter_dir.rsplit("/", 1)[-1],
        adapter_dir + "/adapter_model.safetensors", "/", "/etc", "/proc/self/mem", "/dev/zero",
        "relative/path", "~"]))
    return st.builds(
        lambda adapter_id, p, rid, public, shared: adapters_pb2.RegisterAdapterRequest(
            adapter_id=adapter_id, path=p, request_id=rid, public=public, shared_with=shared),
        st.one_of(TEXT, st.from_regex(r"fz-new-[a-z0-9]{1,8}", fullmatch=True)), path,
        st.one_of(st.just(""), TEXT), st.booleans(), st.lists(TEXT, max_size=3))


def upload_stream() -> st.SearchStrategy[list[adapters_pb2.UploadAdapterChunk]]:
    header = st.builds(
        lambda adapter_id, rid, public, shared: adapters_pb2.UploadAdapterChunk(
            header=adapters_pb2.UploadHeader(adapter_id=adapter_id, request_id=rid,
                                             public=public, shared_with=shared)),
        TEXT, TEXT, st.booleans(), st.lists(TEXT, max_size=2))
    chunk = st.builds(
        lambda name, data: adapters_pb2.UploadAdapterChunk(
            chunk=adapters_pb2.FileChunk(file_name=name, data=data)),
        st.one_of(st.sampled_from(["adapter_config.json", "adapter_model.safetensors",
                                   "adapter_model.bin", "../x", "/etc/passwd", ""]), TEXT),
        st.one_of(st.binary(max_size=256), st.sampled_from([
            b"{}", b'{"r": 8}', b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
            b"\xff" * 8 + b"{", b"\x80\x04pickle"])))
    return st.one_of(st.lists(st.one_of(header, chunk), max_size=5),
                     st.builds(lambda h, cs: [h, *cs], header, st.lists(chunk, max_size=4)))


@dataclass
class Call:
    method: str
    """"/slora.v1.Service/Method"."""
    request: object
    """The request message, or a list of them for a client stream."""


def public_call(adapter_ids: list[str], adapter_dir: str) -> st.SearchStrategy[Call]:
    """One call to the public API, any service, any method, any field values. Generation
    is weighted up (the calls that reach the model)."""
    gen = generate_request(adapter_ids)
    def call(method):
        return lambda request: Call(method, request)
    return st.one_of(
        gen.map(call("/slora.v1.Generation/Generate")),
        gen.map(call("/slora.v1.Generation/Generate")),
        gen.map(call("/slora.v1.Generation/GenerateStream")),
        register_request(adapter_dir).map(call("/slora.v1.Adapters/Register")),
        upload_stream().map(call("/slora.v1.Adapters/Upload")),
        st.builds(adapters_pb2.GetAdapterRequest, adapter_id=st.one_of(
            TEXT, st.sampled_from(adapter_ids))).map(call("/slora.v1.Adapters/Get")),
        st.just(adapters_pb2.ListAdaptersRequest()).map(call("/slora.v1.Adapters/List")),
        st.builds(adapters_pb2.DeleteAdapterRequest, adapter_id=TEXT.filter(
            lambda a: a not in adapter_ids)).map(call("/slora.v1.Adapters/Delete")),
        st.builds(keys_pb2.ListKeysRequest, tenant=TEXT, include_revoked=st.booleans()
                  ).map(call("/slora.v1.Keys/List")),
        st.builds(keys_pb2.RevokeKeyRequest, key_id=st.one_of(
            TEXT, st.from_regex(r"[0-9a-f]{16}", fullmatch=True))).map(call("/slora.v1.Keys/Revoke")),
    )


# -- raw bytes that are not our messages -----------------------------------------------------

GARBAGE_MESSAGES = st.one_of(
    st.binary(max_size=512),
    st.sampled_from([
        b"\x0a\x02\xff\xfe",              # field 1 (a string) holding invalid UTF-8
        b"\x12\x04\xc3\x28\xa0\xa1",      # field 2 likewise
        b"\x0f",                          # wire type 7 does not exist
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # an 11-byte varint
        b"\x0a\xff\xff\xff\xff\x0f",      # a length of 4 GiB in a 6-byte message
        b"\x08",                          # a tag with no value
        b"\x32\x05\x08\x01",              # a submessage cut short
    ]),
    st.builds(lambda prefix, tail: prefix + tail,
              st.sampled_from([b"\x0a\x02", b"\x1a\x03", b"\x32\x10", b"\x3a\x80\x01"]),
              st.binary(max_size=64)),
)
