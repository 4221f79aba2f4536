"""Calls that used to make a handler raise (real processes, auth off, as `slora up
--no-auth` runs): each now gets its own status and message, no traceback reaches any log,
and UNKNOWN never comes back: `Health/List`, every `keys` command without auth, uploads of a
pickled or missing adapter folder, and `--max-new-tokens 0`."""
from __future__ import annotations

import os
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_procs import slora_module
from helpers_stack import PROCESS_ENV, Stack, worker_argv
from slora.client import InvalidArgumentError

PROCESSES = ("worker", "scheduler", "frontend")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("handlers")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=47)
    stack = Stack(str(root), base, worker_argv(base), adapter_roots=[str(root)],
                  auth=False).start_all()
    good = make_peft_adapter(base, str(root / "good"), r=4, seed=3)
    pickled = str(root / "pickled")
    shutil.copytree(good, pickled)
    os.rename(os.path.join(pickled, "adapter_model.safetensors"),
              os.path.join(pickled, "adapter_model.bin"))
    stack.folders = {"good": good, "pickled": pickled, "missing": str(root / "no-such")}
    yield stack
    stack.stop_all()


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(slora_module("slora.client.cli", *args, "--address", stack.address),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **PROCESS_ENV, "SLORA_API_KEY": ""})


def tracebacks(stack: Stack) -> list[dict]:
    return [line for name in PROCESSES for line in stack.log_lines(name)
            if "exc" in line or "Traceback" in line.get("msg", "")]


@pytest.mark.parametrize("port_of", ["frontend", "scheduler", "worker"])
def test_health_list_answers_every_service(stack, port_of):
    """grpc.health.v1 Health/List on each server lists its services, SERVING, instead of
    UNIMPLEMENTED with a traceback in the log."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports[port_of]}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(),
                                                         timeout=10)
    assert reply.statuses[""].status == health_pb2.HealthCheckResponse.SERVING, reply
    assert len(reply.statuses) >= 2, reply
    assert tracebacks(stack) == []


@pytest.mark.parametrize("args", [("keys", "list"), ("keys", "create", "acme"),
                                  ("keys", "revoke", "k123")])
def test_keys_commands_without_auth_say_auth_is_off(stack, args):
    """Under --no-auth each keys command exits 1 with FAILED_PRECONDITION "auth is off",
    not UNIMPLEMENTED "Method not found!"."""
    done = cli(stack, *args)
    assert done.returncode == 1, done
    assert "FAILED_PRECONDITION" in done.stderr and "auth is off" in done.stderr, done.stderr
    assert tracebacks(stack) == []


@pytest.mark.parametrize("folder, words", [
    ("pickled", "adapter_model.bin, a pickle"), ("missing", "no such folder")])
def test_uploading_a_pickled_or_missing_folder_says_why(stack, folder, words):
    """`slora adapters add ID PATH --upload` of a folder with adapter_model.bin, or of no
    folder at all, exits 1 with INVALID_ARGUMENT naming the folder and the reason (the SDK
    raises InvalidArgumentError), not UNKNOWN "Exception iterating requests!"; a good folder
    then uploads."""
    path = stack.folders[folder]
    done = cli(stack, "adapters", "add", f"up-{folder}", path, "--upload")
    assert done.returncode == 1, done
    assert "INVALID_ARGUMENT" in done.stderr and words in done.stderr, done.stderr
    assert path in done.stderr and "UNKNOWN" not in done.stderr + done.stdout
    with stack.client() as c:
        with pytest.raises(InvalidArgumentError, match=words):
            c.upload_adapter(f"up-{folder}", path)
        assert c.upload_adapter(f"up-good-{folder}", stack.folders["good"]).adapter_id


def test_max_new_tokens_zero_is_refused_not_sixteen(stack):
    """`slora generate --max-new-tokens 0` exits 2 naming the flag and the limit, and the SDK
    raises InvalidArgumentError for max_new_tokens=0, instead of generating 16 tokens."""
    done = cli(stack, "generate", "hello", "--max-new-tokens", "0")
    assert done.returncode == 2, done
    assert "--max-new-tokens" in done.stderr and ">= 1, got 0" in done.stderr, done.stderr
    with stack.client() as c:
        with pytest.raises(InvalidArgumentError, match=r"max_new_tokens must be .* >= 1, got 0"):
            c.generate([5, 6, 7], max_new_tokens=0)
        assert len(c.generate([5, 6, 7], max_new_tokens=1, ignore_eos=True).token_ids) == 1
