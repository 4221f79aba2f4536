"""A newcomer's first hour, against a real stack (embedded valkey, worker, scheduler,
frontend on loopback, auth on) with HOME pointing at a fresh folder, so that the SDK and
the CLI find `~/.slora/admin.key` exactly as after `slora up`: the README's SDK example and
`slora demo-adapters` run twice; the messages a newcomer meets say what is wrong and what
to do."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_procs import slora_module
from helpers_stack import PROCESS_ENV, Stack, worker_argv
from slora.client import Client, InvalidArgumentError, UnauthenticatedError
from slora.frontend.reflection import V1_METHOD, V1_PACKAGE, V1_SERVICE_NAME, v1_file_descriptor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODEL_LEN = 96
MAX_LORA_RANK = 16


def readme_block(marker: str) -> str:
    """The fenced code block right after `<!-- marker -->` in README.md."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no block after <!-- {marker} -->"
    return match.group(1)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh HOME whose ~/.slora is the stack's data folder (the admin key lands in
    ~/.slora/admin.key, as `slora up` puts it)."""
    home = tmp_path_factory.mktemp("home")
    base = make_tiny_llama(str(home / "base"), num_kv_heads=2, seed=3)
    stack = Stack(str(home / ".slora"), base,
                  worker_argv(base, max_model_len=MAX_MODEL_LEN, max_lora_rank=MAX_LORA_RANK),
                  adapter_roots=[str(home)])
    stack.start_all()
    stack.home = home
    stack.env = {k: v for k, v in os.environ.items()
                 if k not in ("SLORA_API_KEY", "SLORA_DATA_DIR")}
    stack.env.update(PROCESS_ENV, HOME=str(home), SLORA_ADDRESS=stack.address)
    yield stack
    stack.stop_all()


def run_cli(stack: Stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(slora_module("slora.client.cli", *args), env=stack.env,
                          capture_output=True, text=True, timeout=timeout)


def test_readme_sdk_example_and_demo_adapters_run_twice(home):
    """`slora demo-adapters 2` then `3` tops up: the second run registers demo-2 and says
    the other two were already there; then the README's SDK example (read from README.md)
    runs twice, registering the same folder under the same id, and streams text both
    times."""
    base = home.base
    first = run_cli(home, "demo-adapters", "2", "--model", base, "--ranks", "4,8")
    assert first.returncode == 0, first.stderr
    assert "2 adapters registered, 0 already were" in first.stdout, first.stdout
    second = run_cli(home, "demo-adapters", "3", "--model", base, "--ranks", "4,8")
    assert second.returncode == 0, second.stderr
    assert "1 adapters registered, 2 already were" in second.stdout, second.stdout
    with home.client() as c:
        assert {"demo-0", "demo-1", "demo-2"} <= {a.adapter_id for a in c.list_adapters()}

    example = readme_block("sdk-example")
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-P", "-c", example],
                              env=home.env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"run {attempt + 1}: {proc.stderr[-3000:]}"
        assert proc.stdout, f"run {attempt + 1} printed nothing"


def test_other_content_under_a_taken_id_says_what_to_do(home, tmp_path):
    """Another folder under an id already registered: ALREADY_EXISTS, exit 1, and the
    message says to delete it first or choose another id."""
    other = make_peft_adapter(home.base, str(home.home / "other"), r=4, seed=99)
    with home.client() as c:
        c.register_adapter("taken", make_peft_adapter(home.base, str(home.home / "first"),
                                                      r=4, seed=98))
    proc = run_cli(home, "adapters", "add", "taken", other)
    assert proc.returncode == 1
    assert "ALREADY_EXISTS" in proc.stderr and "delete it first or choose another id" in \
        proc.stderr, proc.stderr


def test_sdk_finds_the_admin_key_and_says_how_to_pass_one(home):
    """With no api_key= and no $SLORA_API_KEY, the SDK calls with ~/.slora/admin.key (as the
    CLI does); a wrong key is UNAUTHENTICATED with a message naming api_key= and
    $SLORA_API_KEY."""
    script = ("from slora.client import Client\n"
              "with Client() as c:\n"
              "    print(len(c.list_adapters()))\n")
    proc = subprocess.run([sys.executable, "-P", "-c", script], env=home.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Client(home.address, api_key="slora_wrong_key", retries=0) as c:
        with pytest.raises(UnauthenticatedError) as err:
            c.list_adapters()
    text = str(err.value)
    assert "api_key=" in text and "$SLORA_API_KEY" in text and "admin.key" in text, text


def test_max_new_tokens_past_the_context_names_the_limit(home):
    """--max-new-tokens 100000 is INVALID_ARGUMENT naming the context limit, the flag and
    how many tokens fit with this prompt, not an early abort; up to max_model_len is served,
    ending with "length" where the context ends."""
    proc = run_cli(home, "generate", "Hi", "--max-new-tokens", "100000")
    assert proc.returncode == 1
    assert "INVALID_ARGUMENT" in proc.stderr, proc.stderr
    assert "max_new_tokens 100000" in proc.stderr and f"max_model_len {MAX_MODEL_LEN}" in \
        proc.stderr and "--max-model-len" in proc.stderr, proc.stderr
    with home.client() as c:
        with pytest.raises(InvalidArgumentError) as err:
            c.generate([5, 6, 7], max_new_tokens=MAX_MODEL_LEN + 1)
        assert f"at most {MAX_MODEL_LEN - 3} new tokens fit" in err.value.details, err.value
        capped = c.generate([5, 6, 7], max_new_tokens=MAX_MODEL_LEN, ignore_eos=True)
    assert (capped.completion_tokens, capped.finish_reason) == (MAX_MODEL_LEN - 3, "length")


def test_a_rank_past_the_pool_names_the_flag(home):
    """An adapter of rank 32 on a pool of max_lora_rank 16: the refusal names both ranks
    and the flag that raises the limit."""
    path = make_peft_adapter(home.base, str(home.home / "rank32"), r=32, seed=5)
    with home.client() as c:
        with pytest.raises(InvalidArgumentError) as err:
            c.register_adapter("rank32", path)
    text = err.value.details
    assert "rank 32" in text and str(MAX_LORA_RANK) in text and "--max-lora-rank" in text, text


def test_resident_adapters_metric_names_the_device(home):
    """The scheduler's resident-adapter gauge carries the worker's device as a label
    (cpu here), not "gpu" in its name."""
    text = home.metrics_text("scheduler")
    assert re.search(r'^slora_adapters_resident\{device="cpu"\} ', text, re.M), \
        [line for line in text.splitlines() if "resident" in line]
    assert "slora_adapters_resident_gpu" not in text


class V1ReflectionStub:
    """grpc.reflection.v1's stub: its method path, its own message types (built from the v1
    descriptor the frontend serves) on the wire."""

    def __init__(self, channel: grpc.Channel):
        pool = descriptor_pool.DescriptorPool()
        pool.Add(v1_file_descriptor())
        response = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{V1_PACKAGE}.ServerReflectionResponse"))
        self.ServerReflectionInfo = channel.stream_stream(
            f"/{V1_SERVICE_NAME}/{V1_METHOD}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString)


def test_reflection_v1_lists_and_describes_the_services(home):
    """grpc.reflection.v1 is served beside v1alpha: grpc_reflection's descriptor database
    (its client), speaking v1, lists every public service and both reflection services,
    and resolves Generation's file and the v1 service's own."""
    with grpc.insecure_channel(home.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        db._stub = V1ReflectionStub(channel)  # the library's client knows only v1alpha's path
        services = set(db.get_services())
        assert {"slora.v1.Generation", "slora.v1.Adapters", "slora.v1.Keys",
                "grpc.health.v1.Health", V1_SERVICE_NAME,
                "grpc.reflection.v1alpha.ServerReflection"} <= services, services
        assert db.FindFileContainingSymbol("slora.v1.Generation").package == "slora.v1"
        assert db.FindFileContainingSymbol(V1_SERVICE_NAME).package == V1_PACKAGE


@pytest.mark.slow
def test_readme_engine_example_gives_text_on_smollm2(tmp_path):
    """The README's in-process Engine example (read from README.md), with a fresh HOME:
    SmolLM2 converted from its wheel, `slora demo-adapters 1` for the adapter; it prints
    SmolLM2's answer as text, with and without the adapter."""
    from slora.common.errors import ConfigError
    from slora.models.gguf_convert import find_smollm2_gguf
    try:
        find_smollm2_gguf()
    except ConfigError as e:
        pytest.skip(str(e))
    env = {**os.environ, **PROCESS_ENV, "HOME": str(tmp_path)}
    env.pop("SLORA_DATA_DIR", None)
    demo = subprocess.run(slora_module("slora.client.cli", "demo-adapters", "1",
                                       "--no-register"), env=env, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-P", "-c", readme_block("engine-example")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "The capital of France is Paris.", proc.stdout
    assert len(lines) == 2 and lines[1].strip(), proc.stdout
