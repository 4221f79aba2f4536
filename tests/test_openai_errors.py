"""Errors of the OpenAI HTTP API, through the official `openai` package: every status the
API promises, each with OpenAI's error body ({"error": {message, type, param, code}}) naming
what was wrong: 400 bad parameters, 401 bad key, 403, 404 unknown model, 409, 413, 429 with
Retry-After on a full queue, 503 while no scheduler serves, 504 past the deadline. Also: a
client that disconnects frees its pages, and SIGTERM drains HTTP calls like gRPC ones.

The stack runs one request at a time with a queue of one, and the scheduler is paused where
a test needs requests to wait, so nothing here depends on the machine's speed."""
from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_procs import stop_process
from helpers_stack import Stack, worker_argv

MAX_MODEL_LEN = 256
"""Long enough that a stream of MAX_MODEL_LEN - 4 tokens still runs when the test pauses
the scheduler after its first chunk."""
MAX_REQUESTS_PER_TENANT = 2
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-errors")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=23)
    roots = root / "adapters"
    folder = make_peft_adapter(base, str(roots / "a"), r=4, seed=1)
    other = make_peft_adapter(base, str(roots / "b"), r=4, seed=2)
    argv = worker_argv(base, max_model_len=MAX_MODEL_LEN, max_num_seqs=1)
    stack = Stack(str(root), base, argv, ["--max-queue-len", "1"],
                  adapter_roots=[str(roots)],
                  frontend_args=["--max-requests-per-tenant", str(MAX_REQUESTS_PER_TENANT)]
                  ).start_all()
    stack.folder, stack.other = folder, other
    with stack.client() as admin:
        stack.bob_key = admin.create_key("bob").secret
        revoked = admin.create_key("gone")
        admin.revoke_key(revoked.key.key_id)
        stack.revoked_key = revoked.secret
        admin.register_adapter("ad", folder)
        admin.register_adapter("open", folder, public=True)
    yield stack
    stack.pause(False)
    stack.stop_all()


@pytest.fixture
def paused(stack):
    """The scheduler paused for the test, resumed and idle after it."""
    with stack.paused():
        yield stack


def wait_serving(stack: Stack, timeout_s: float = 30.0) -> None:
    """Until GET /health says SERVING (the frontend sees its scheduler)."""
    url = stack.http_url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "the frontend does not serve"
        time.sleep(0.05)


def client(stack: Stack, key: str | None = None, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.http_url, api_key=key or stack.admin_key,
                         max_retries=0, timeout=60, **kwargs)


def check_error(err: openai.APIStatusError, status: int, code: str, *words: str) -> dict:
    """The response has `status` and OpenAI's error body with `code` and `words` in its
    message; returns the error object."""
    assert err.status_code == status, (err.status_code, err.response.text)
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param",
                                                              "code"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["type"], str) and body["error"]["type"], body
    for word in words:
        assert word in body["error"]["message"], body
    return body["error"]


# -- 400, 401, 403, 404, 409, 413 -------------------------------------------------------------

BAD_BODIES = [
    ("completions", {"n": 2}, "n"),
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": "ten"}, "max_tokens"),
    ("completions", {"seed": -1}, "seed"),
    ("completions", {"logprobs": 3}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"logit_bias": {"5": 1.0}}, "logit_bias"),
    ("completions", {"stop": ["x"] * 17}, "stop"),
    ("completions", {"stop_token_ids": [999]}, "vocabulary"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": ""}, "prompt is empty"),
    ("completions", {"prompt": ["a", "b"]}, "2 prompts"),
    ("completions", {"prompt": [5, 900]}, "vocabulary"),
    ("completions", {"prompt": "y" * 300}, "max_model_len"),
    ("completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("completions", {"model": 7}, "model"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "image_url"),
    ("chat/completions", {"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("path,fields,word", BAD_BODIES,
                         ids=[f"{p}-{next(iter(f))}-{w}" for p, f, w in BAD_BODIES])
def test_invalid_parameters_are_400_naming_the_field(stack, path, fields, word):
    """Each invalid or unsupported parameter: 400 (openai.BadRequestError), code
    invalid_argument, the message naming the field or limit; the stack serves on."""
    body = {"model": "ad", "max_tokens": 2}
    body.update({"prompt": "hi"} if path == "completions" else
                {"messages": [{"role": "user", "content": "hi"}]})
    body.update(fields)
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).post(f"/{path}", cast_to=object, body=body)
    check_error(err.value, 400, "invalid_argument", word)


def raw_post(stack: Stack, path: str, data: bytes, headers: dict[str, str]):
    request = urllib.request.Request(f"{stack.http_url}{path}", data=data, headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_a_body_that_is_not_json_is_400_and_one_too_large_is_413(stack):
    auth = {"Authorization": f"Bearer {stack.admin_key}", "Content-Type": "application/json"}
    status, _, body = raw_post(stack, "/completions", b'{"model": "ad", "prompt": ', auth)
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"], body
    status, _, body = raw_post(stack, "/completions", b" " * (9 << 20), auth)
    assert status == 413 and json.loads(body)["error"]["code"] == "resource_exhausted", body


def test_bad_timeout_header_is_400(stack):
    with pytest.raises(openai.BadRequestError) as err:
        client(stack).completions.create(model="ad", prompt="hi", max_tokens=2,
                                         extra_headers={"x-slora-timeout-s": "soon"})
    check_error(err.value, 400, "invalid_argument", "x-slora-timeout-s", "soon")


@pytest.mark.parametrize("key,word", [
    ("not-a-key", "invalid API key"), (None, "revoked"),
    ("slora_0123456789abcdef_" + "A" * 43, "invalid API key")])
def test_a_bad_key_is_401(stack, key, word):
    """A malformed, revoked or unknown key: 401 (openai.AuthenticationError)."""
    with pytest.raises(openai.AuthenticationError) as err:
        client(stack, key or stack.revoked_key).models.list()
    check_error(err.value, 401, "unauthenticated", word)


def test_a_missing_key_is_401(stack):
    status, _, body = raw_post(stack, "/completions", b"{}", {})
    assert status == 401 and "API key" in json.loads(body)["error"]["message"], body


def test_what_a_tenant_may_not_do_is_403(stack):
    """bob unloading the admin's public adapter (he sees it, he does not own it), and
    loading a folder outside the adapter roots: 403 (openai.PermissionDeniedError)."""
    bob = client(stack, stack.bob_key)
    with pytest.raises(openai.PermissionDeniedError) as err:
        bob.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "admin/open"})
    check_error(err.value, 403, "permission_denied", "owner")
    with pytest.raises(openai.PermissionDeniedError) as err:
        bob.post("/load_lora_adapter", cast_to=str,
                 body={"lora_name": "x", "lora_path": stack.base})
    check_error(err.value, 403, "permission_denied")


def test_unknown_models_and_adapters_are_404(stack):
    """An unknown model, another tenant's private adapter (answered exactly like one that
    does not exist), unloading an unknown adapter, an unknown path: 404."""
    bob = client(stack, stack.bob_key)
    for model in ("nope", "admin/ad"):
        with pytest.raises(openai.NotFoundError) as err:
            bob.completions.create(model=model, prompt="hi", max_tokens=2)
        e = check_error(err.value, 404, "not_found", repr(model))
        assert e["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.create(model=model, messages=[{"role": "user",
                                                                "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as err:
        bob.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "nope"})
    check_error(err.value, 404, "not_found", "nope")
    with pytest.raises(openai.NotFoundError) as err:
        bob.post("/embeddings", cast_to=object, body={})
    check_error(err.value, 404, "not_found")


def test_an_id_taken_by_other_content_is_409(stack):
    c = client(stack)
    with pytest.raises(openai.ConflictError) as err:
        c.post("/load_lora_adapter", cast_to=str, body={"lora_name": "ad",
                                                        "lora_path": stack.other})
    check_error(err.value, 409, "already_exists", "ad")


# -- 429, 503, 504 ----------------------------------------------------------------------------

def test_a_full_queue_is_429_with_retry_after(paused):
    """Scheduler paused, queue of one: one request waits, the next is refused at once with
    429 (openai.RateLimitError), Retry-After in whole seconds and retry-after-ms; once
    resumed the waiting one is served."""
    stack = paused
    c = client(stack)
    with cf.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(c.completions.create, model="ad", prompt="hi", max_tokens=3,
                              **GREEDY)
        stack.wait_for_stats(lambda v: v["num_waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model="ad", prompt="hi", max_tokens=3, stream=True)
        stack.pause(False)
        assert waiting.result(timeout=60).usage.completion_tokens == 3
    check_error(err.value, 429, "resource_exhausted", "queue")
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert int(err.value.response.headers["retry-after-ms"]) >= 1


def test_a_tenant_at_its_request_limit_is_429(paused):
    """bob's limit is 2 requests at once: one running (the scheduler paused under it) and
    one queued, his third is refused at once with 429 naming the limit; once resumed both
    are served."""
    stack = paused
    stack.pause(False)
    bob = client(stack, stack.bob_key)
    running = bob.completions.create(model="admin/open", prompt="hi",
                                     max_tokens=MAX_MODEL_LEN - 4, stream=True, **GREEDY)
    chunks = iter(running)
    next(chunks)
    stack.pause(True)
    assert stack.stats()["num_running"] == 1
    with cf.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(bob.completions.create, model="admin/open", prompt="hi",
                              max_tokens=3, **GREEDY)
        stack.wait_for_stats(lambda v: v["num_waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as err:
            bob.completions.create(model="admin/open", prompt="hi", max_tokens=3)
        stack.pause(False)
        assert waiting.result(timeout=60).usage.completion_tokens == 3
    assert list(chunks)[-1].choices[0].finish_reason == "length"
    check_error(err.value, 429, "resource_exhausted", "'bob'", "2 requests")
    assert err.value.response.headers["retry-after"] == "1"


def test_past_the_deadline_is_504(paused):
    """x-slora-timeout-s: 0.5 on a paused scheduler: 504 (deadline exceeded), and the
    request left the queue."""
    c = client(paused)
    with pytest.raises(openai.InternalServerError) as err:
        c.chat.completions.create(model="ad", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=3, extra_headers={"x-slora-timeout-s": "0.5"})
    check_error(err.value, 504, "deadline_exceeded")
    assert paused.wait_for_stats(lambda v: v["num_waiting"] == 0)["num_waiting"] == 0


def test_a_client_that_disconnects_frees_its_pages(paused):
    """A stream gets its first chunk, then the scheduler pauses with the request running
    and holding KV pages; the client closes the connection: the request is gone and its
    pages free while the scheduler is still paused (no step ran)."""
    stack = paused
    stack.pause(False)
    c = client(stack)
    stream = c.completions.create(model="ad", prompt="hi", max_tokens=MAX_MODEL_LEN - 4,
                                  stream=True, **GREEDY)
    next(iter(stream))
    stack.pause(True)
    running = stack.stats()
    assert running["num_running"] == 1 and running["pages_kv"] > 0, running
    stream.close()
    after = stack.wait_for_stats(lambda v: v["num_running"] == 0 and v["pages_kv"] == 0)
    assert after["num_running"] == 0 and after["pages_kv"] == 0, after


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_pages(paused):
    """Not streamed: the request runs, the scheduler pauses under it, the client's own 2 s
    timeout closes the connection: the request is gone and its pages free, the scheduler
    still paused."""
    stack = paused
    stack.pause(False)
    c = openai.OpenAI(base_url=stack.http_url, api_key=stack.admin_key, max_retries=0,
                      timeout=2.0)
    with cf.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(c.completions.create, model="ad", prompt="hi",
                             max_tokens=MAX_MODEL_LEN - 4, **GREEDY)
        stack.wait_for_stats(lambda v: v["num_running"] == 1)
        stack.pause(True)
        with pytest.raises(openai.APITimeoutError):
            answer.result(timeout=60)
    after = stack.wait_for_stats(lambda v: v["num_running"] == 0 and v["pages_kv"] == 0)
    assert after["num_running"] == 0 and after["pages_kv"] == 0, after


def test_no_scheduler_is_503_with_retry_after(stack):
    """The scheduler stopped: 503 (openai.InternalServerError) with Retry-After; once it
    is back the same call is served."""
    stack.stop("scheduler")
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client(stack).completions.create(model="ad", prompt="hi", max_tokens=2)
        check_error(err.value, 503, "unavailable")
        assert err.value.response.headers["retry-after"] == "1"
    finally:
        stack.start("scheduler")
    wait_serving(stack)
    assert client(stack).completions.create(model="ad", prompt="hi", max_tokens=2,
                                            **GREEDY).usage.completion_tokens == 2


def test_sigterm_lets_a_running_http_stream_finish_and_refuses_new_calls(stack):
    """SIGTERM to the frontend while an HTTP stream runs (scheduler paused under it): new
    HTTP calls get 503 "shutting down", the running stream ends normally once the
    scheduler resumes, and the frontend exits 0."""
    stack.wait_pool_idle()
    c = client(stack)
    stream = c.completions.create(model="ad", prompt="hi", max_tokens=12, stream=True,
                                  **GREEDY)
    chunks = iter(stream)
    first = next(chunks)
    stack.pause(True)
    proc = stack.procs["frontend"]
    proc.send_signal(signal.SIGTERM)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client(stack).models.list()
            except openai.InternalServerError as e:
                check_error(e, 503, "unavailable", "shutting down")
                break
            assert time.monotonic() < deadline, "the frontend never began to drain"
    finally:
        stack.pause(False)
    rest = list(chunks)
    assert first.choices[0].finish_reason is None
    assert rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(30) == 0
    stop_process(stack.procs.pop("frontend"))
    stack.start("frontend")
    wait_serving(stack)


def test_a_stream_whose_key_is_revoked_ends_with_a_401_event(stack):
    """As on gRPC (test_stack_hardening): an HTTP stream whose key is revoked while it runs
    ends at its next token once REVOCATION_CHECK_S has passed, with one error event (status
    401, 'revoked') instead of its remaining chunks; the next call with the key is 401."""
    from slora.frontend.auth import REVOCATION_CHECK_S

    stack.wait_pool_idle()
    with stack.client() as admin:
        made = admin.create_key("frank")
    frank = client(stack, made.secret)
    stream = frank.completions.create(model="admin/open", prompt="hi",
                                      max_tokens=MAX_MODEL_LEN - 4, stream=True, **GREEDY)
    chunks = iter(stream)
    next(chunks)
    stack.pause(True)
    try:
        with stack.client() as admin:
            admin.revoke_key(made.key.key_id)
        time.sleep(REVOCATION_CHECK_S + 0.1)  # the check's period is the behaviour here
    finally:
        stack.pause(False)
    with pytest.raises(openai.APIError) as ended:
        for _ in chunks:
            pass
    assert "revoked" in str(ended.value.message), ended.value
    assert ended.value.body["status"] == 401 and ended.value.body["code"] == "unauthenticated"
    with pytest.raises(openai.AuthenticationError):
        frank.models.list()
