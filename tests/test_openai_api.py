"""The OpenAI-compatible HTTP API against a real stack, through the official `openai` package
(sync and async, streamed and not): the same greedy tokens as the gRPC API for the same
adapter and prompt (so PEFT's, which the oracle tests hold the gRPC API to), chat through
the model's own template (transformers renders the oracle), /v1/models exactly the caller's,
vLLM's load/unload under our tenancy, 50 concurrent SSE streams across 10 adapters, and
`curl -N`. The error statuses that need a paused or stopped scheduler are in
test_openai_errors.py."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import openai
import pytest

from helpers_peft import add_chat_tokenizer, make_peft_adapter, make_tiny_llama
from helpers_stack import Stack, worker_argv

TEXTS = ["hello world", "the capital of France is Paris", "what is two plus two",
         "a small model answers", "tokens stream back"]
NUM_ADAPTERS = 10
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
MAX_TOKENS = 8


def token_ids(logprob_tokens: list[str]) -> list[int]:
    """The ids of `return_tokens_as_token_ids` tokens ("token_id:N")."""
    assert all(t.startswith("token_id:") for t in logprob_tokens), logprob_tokens
    return [int(t.split(":", 1)[1]) for t in logprob_tokens]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=21, vocab_size=320)
    add_chat_tokenizer(base, TEXTS)
    adapters_dir = root / "adapters"
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)  # loaded once for the 10 adapters
    folders = [make_peft_adapter(model, str(adapters_dir / f"ad-{i}"), r=4 if i % 2 else 8,
                                 seed=100 + i) for i in range(NUM_ADAPTERS)]
    stack = Stack(str(root), base, worker_argv(base, max_model_len=128, max_num_seqs=32),
                  adapter_roots=[str(adapters_dir)]).start_all()
    stack.folders = folders
    stack.keys = {}
    try:
        with stack.client() as admin:
            for i, folder in enumerate(folders):
                admin.register_adapter(f"ad-{i}", folder)
            for tenant in ("alice", "bob"):
                stack.keys[tenant] = admin.create_key(tenant).secret
        yield stack
    finally:
        stack.stop_all()


def client(stack: Stack, key: str | None = None, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.http_url, api_key=key or stack.admin_key,
                         max_retries=0, timeout=120, **kwargs)


def async_client(stack: Stack, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.http_url, api_key=key or stack.admin_key,
                              max_retries=0, timeout=120)


def grpc_greedy(stack: Stack, prompt, adapter_id: str, max_tokens: int = MAX_TOKENS,
                **kwargs):
    with stack.client() as c:
        return c.generate(prompt, adapter_id=adapter_id, max_new_tokens=max_tokens,
                          ignore_eos=True, return_logprobs=True, **kwargs)


# -- the same tokens as the gRPC API ---------------------------------------------------------

@pytest.mark.parametrize("model", ["base", "ad-0", "ad-1", "ad-7"])
def test_completions_give_the_grpc_apis_greedy_tokens(world, model):
    """For the base model and three adapters (ranks 8 and 4), a text prompt: the sync
    client's completion, streamed and not, and the async client's, streamed and not, have
    the gRPC API's greedy token ids, text and usage, and log-probabilities within 1e-5."""
    prompt = TEXTS[1]
    expected = grpc_greedy(world, prompt, "" if model == "base" else model)
    c = client(world)
    full = c.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, logprobs=0,
                                **GREEDY)
    choice = full.choices[0]
    assert token_ids(choice.logprobs.tokens) == expected.token_ids, model
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (
        expected.prompt_tokens, MAX_TOKENS)

    streamed = list(c.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                         logprobs=0, stream=True, **GREEDY))
    assert [t for ch in streamed for t in token_ids(ch.choices[0].logprobs.tokens)
            if ch.choices[0].logprobs] == expected.token_ids
    assert "".join(ch.choices[0].text for ch in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == "length"

    async def run_async():
        ac = async_client(world)
        async with ac:
            one = await ac.completions.create(model=model, prompt=prompt,
                                              max_tokens=MAX_TOKENS, logprobs=0, **GREEDY)
            stream = await ac.completions.create(model=model, prompt=prompt,
                                                 max_tokens=MAX_TOKENS, stream=True, **GREEDY)
            text = "".join([ch.choices[0].text async for ch in stream])
        return one, text

    one, text = asyncio.run(run_async())
    assert token_ids(one.choices[0].logprobs.tokens) == expected.token_ids
    assert text == expected.text


def test_a_token_id_prompt_is_used_as_it_is(world):
    """prompt as token ids (also as a list of one list): the gRPC API's tokens for the same
    ids."""
    ids = [5, 17, 200, 9]
    expected = grpc_greedy(world, ids, "ad-2")
    c = client(world)
    for prompt in (ids, [ids]):
        out = c.completions.create(model="ad-2", prompt=prompt, max_tokens=MAX_TOKENS,
                                   logprobs=0, **GREEDY)
        assert token_ids(out.choices[0].logprobs.tokens) == expected.token_ids
        assert out.usage.prompt_tokens == len(ids)


def test_chat_renders_the_models_template_and_gives_the_grpc_apis_tokens(world):
    """A chat of system, user, assistant and user messages (one with content parts): the
    prompt is the model's chat template rendered by transformers (usage counts its tokens),
    and the answer's tokens are the gRPC API's for those prompt ids, sync and async,
    streamed and not."""
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "answer briefly"},
                {"role": "user", "content": TEXTS[2]},
                {"role": "assistant", "content": "four"},
                {"role": "user", "content": [{"type": "text", "text": "and "},
                                             {"type": "text", "text": TEXTS[3]}]}]
    hf = PreTrainedTokenizerFast.from_pretrained(world.base)
    flat = [dict(m, content=m["content"] if isinstance(m["content"], str)
                 else "".join(p["text"] for p in m["content"])) for m in messages]
    prompt_ids = hf.apply_chat_template(flat, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    expected = grpc_greedy(world, prompt_ids, "ad-3")
    c = client(world)
    out = c.chat.completions.create(model="ad-3", messages=messages, max_tokens=MAX_TOKENS,
                                    logprobs=True, **GREEDY)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert token_ids([t.token for t in out.choices[0].logprobs.content]) == expected.token_ids
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text

    chunks = list(c.chat.completions.create(model="ad-3", messages=messages, logprobs=True,
                                            max_tokens=MAX_TOKENS, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t for ch in chunks if ch.choices[0].logprobs
            for t in token_ids([x.token for x in ch.choices[0].logprobs.content])] == \
        expected.token_ids
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected.text

    async def run_async():
        async with async_client(world) as ac:
            stream = await ac.chat.completions.create(
                model="ad-3", messages=messages, max_tokens=MAX_TOKENS, stream=True, **GREEDY)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    assert asyncio.run(run_async()) == expected.text


def test_one_user_message_is_the_grpc_apis_chat(world):
    """A chat of one user message gives the tokens of the gRPC API's `chat=True` for that
    text; without max_tokens, chat runs to the end of the context (finish 'length' at
    max_model_len 128)."""
    expected = grpc_greedy(world, TEXTS[0], "ad-4", chat=True)
    c = client(world)
    out = c.chat.completions.create(model="ad-4", messages=[{"role": "user",
                                                             "content": TEXTS[0]}],
                                    max_tokens=MAX_TOKENS, logprobs=True, **GREEDY)
    assert token_ids([t.token for t in out.choices[0].logprobs.content]) == expected.token_ids
    long = c.chat.completions.create(model="ad-4", messages=[{"role": "user",
                                                              "content": TEXTS[0]}], **GREEDY)
    assert long.choices[0].finish_reason == "length"
    assert long.usage.prompt_tokens + long.usage.completion_tokens == 128


def test_a_chat_the_template_refuses_is_400_in_the_templates_words(world):
    """The model's template raises on a chat that opens with the assistant: 400 with the
    template's own message, and the stack serves on."""
    with pytest.raises(openai.BadRequestError) as err:
        client(world).chat.completions.create(
            model="ad-0", messages=[{"role": "assistant", "content": "hi"}], max_tokens=2)
    assert err.value.status_code == 400
    assert "the first message must be system or user" in err.value.body["message"]
    assert err.value.body["code"] == "invalid_argument"


def test_usage_comes_in_the_last_chunk_with_include_usage(world):
    """stream_options.include_usage: every chunk has usage null but one more, last, with
    no choices and the usage; without it no chunk carries usage."""
    c = client(world)
    chunks = list(c.completions.create(model="ad-5", prompt=TEXTS[4], max_tokens=5,
                                       stream=True, stream_options={"include_usage": True},
                                       **GREEDY))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    plain = list(c.completions.create(model="ad-5", prompt=TEXTS[4], max_tokens=5,
                                      stream=True, **GREEDY))
    assert all(ch.usage is None and ch.choices for ch in plain)


def test_stop_strings_cut_the_text_as_on_grpc(world):
    """A stop string taken from the greedy answer itself: the HTTP text stops before it,
    finish 'stop', exactly as the gRPC API's text with the same stop."""
    c = client(world)
    free = c.completions.create(model="ad-6", prompt=TEXTS[0], max_tokens=24, **GREEDY)
    text = free.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    expected = grpc_greedy(world, TEXTS[0], "ad-6", max_tokens=24, stop=[stop])
    out = c.completions.create(model="ad-6", prompt=TEXTS[0], max_tokens=24, stop=stop,
                               **GREEDY)
    assert out.choices[0].text == expected.text == text[:text.find(stop)]
    assert out.choices[0].finish_reason == "stop"


# -- models and adapters ---------------------------------------------------------------------

def test_models_list_shows_exactly_the_callers_adapters(world):
    """alice registers one private adapter through load_lora_adapter; bob one public, one
    shared with alice, one private. alice's models.list() is the base model, her own by id
    and bob's two she may use as bob/id; bob's is the base and his three; the admin's
    adapters are in neither. models.retrieve names the same."""
    folder = world.folders[0]
    alice, bob = client(world, world.keys["alice"]), client(world, world.keys["bob"])
    alice.post("/load_lora_adapter", cast_to=str,
               body={"lora_name": "mine", "lora_path": folder})
    bob.post("/load_lora_adapter", cast_to=str,
             body={"lora_name": "pub", "lora_path": folder, "public": True})
    bob.post("/load_lora_adapter", cast_to=str,
             body={"lora_name": "for-alice", "lora_path": folder, "shared_with": ["alice"]})
    bob.post("/load_lora_adapter", cast_to=str, body={"lora_name": "secret",
                                                      "lora_path": folder})
    assert [m.id for m in alice.models.list()] == ["base", "mine", "bob/for-alice", "bob/pub"]
    assert [m.id for m in bob.models.list()] == ["base", "for-alice", "pub", "secret"]
    admin_ids = [m.id for m in client(world).models.list()]
    assert admin_ids[:1] == ["base"] and "ad-0" in admin_ids and "mine" not in admin_ids
    assert alice.models.retrieve("bob/pub").owned_by == "bob"
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve("bob/secret")
    assert alice.completions.create(model="bob/for-alice", prompt="hi", max_tokens=2,
                                    **GREEDY).usage.completion_tokens == 2


def test_load_use_and_unload_an_adapter_like_vllm(world):
    """POST /v1/load_lora_adapter (vLLM's body) registers a folder under the adapter roots;
    the adapter then serves the gRPC API's tokens for the same folder; /v1/unload_lora_adapter
    removes it and a request for it gets 404. A path outside the roots is 403."""
    c = client(world, world.keys["alice"])
    answer = c.post("/load_lora_adapter", cast_to=str,
                    body={"lora_name": "loaded", "lora_path": world.folders[9]})
    assert "success" in answer.lower()
    out = c.completions.create(model="loaded", prompt=TEXTS[1], max_tokens=MAX_TOKENS,
                               logprobs=0, **GREEDY)
    assert token_ids(out.choices[0].logprobs.tokens) == grpc_greedy(
        world, TEXTS[1], "ad-9").token_ids
    c.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "loaded"})
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="loaded", prompt="hi", max_tokens=2)
    assert "loaded" in err.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError) as err:
        c.post("/load_lora_adapter", cast_to=str,
               body={"lora_name": "outside", "lora_path": world.base})
    assert err.value.body["code"] == "permission_denied"


# -- concurrency, disconnects, curl ----------------------------------------------------------

def test_fifty_concurrent_sse_streams_across_ten_adapters_all_complete(world):
    """50 streams at once from the async client, 5 for each of the 10 adapters, 12 tokens
    each: all end with finish 'length' and usage 12, and the streams of one adapter agree
    with each other and with a request of that adapter alone."""
    num_tokens = 12

    async def one(ac, i):
        stream = await ac.completions.create(
            model=f"ad-{i % NUM_ADAPTERS}", prompt=TEXTS[i % len(TEXTS)], max_tokens=num_tokens,
            stream=True, stream_options={"include_usage": True}, logprobs=0, **GREEDY)
        chunks = [ch async for ch in stream]
        ids = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
               for t in token_ids(ch.choices[0].logprobs.tokens)]
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
        return ids, finish, chunks[-1].usage.completion_tokens

    async def run():
        async with async_client(world) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(50)))

    results = asyncio.run(run())
    assert all(f == "length" and n == num_tokens and len(ids) == num_tokens
               for ids, f, n in results), results
    for i in range(NUM_ADAPTERS):
        same = {tuple(results[j][0]) for j in range(i, 50, NUM_ADAPTERS)}
        assert len(same) == 1, f"ad-{i}: the streams of one adapter and prompt differ"
    alone = grpc_greedy(world, TEXTS[3], "ad-3", max_tokens=num_tokens)
    assert results[3][0] == alone.token_ids
    assert world.wait_pool_idle()["pages_kv"] == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(world):
    """The README's `curl -N` call: `data: {...}` chunks whose text makes the answer, then
    `data: [DONE]`."""
    body = json.dumps({"model": "ad-1", "prompt": TEXTS[1], "max_tokens": 6, "stream": True,
                       "temperature": 0, "ignore_eos": True})
    out = subprocess.run(
        ["curl", "-sS", "-N", f"{world.http_url}/completions",
         "-H", f"Authorization: Bearer {world.admin_key}",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", out
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == grpc_greedy(
        world, TEXTS[1], "ad-1", max_tokens=6).text
    assert all(ch["object"] == "text_completion" for ch in chunks)


def test_health_answers_without_a_key(world):
    """GET /health is open, like gRPC health: 200 SERVING."""
    import urllib.request

    url = world.http_url.removesuffix("/v1") + "/health"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "SERVING"}


def test_the_http_calls_are_in_the_frontends_metrics_and_logs(world):
    """An HTTP completion is counted in slora_requests under method `HTTP /v1/completions`
    and code OK, and logged as a finished request with the client's x-request-id."""
    c = client(world)
    c.completions.create(model="ad-8", prompt="hi", max_tokens=2,
                         extra_headers={"x-request-id": "http-metrics-1"}, **GREEDY)
    metrics = world.metrics_text("frontend")
    assert 'slora_requests_total{code="OK",method="HTTP /v1/completions"}' in metrics
    lines = [e for e in world.log_lines("frontend") if e.get("msg") == "request finished"
             and e.get("client_request_id") == "http-metrics-1"]
    assert lines and lines[0]["code"] == "OK" and lines[0]["output_tokens"] == 2
