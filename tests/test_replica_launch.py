"""How `slora up --replicas N` and `slora replica` lay replicas out: the GPUs split evenly
(or a refusal naming the numbers), a worker and a registered scheduler per replica, and a
frontend that routes from Redis."""
from __future__ import annotations

import pytest

from slora.client import replica_launcher
from slora.client.cli import build_parser
from slora.client.launcher import build_children, replica_envs


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_visible_gpus_are_split_evenly_between_replicas():
    gpus = ["0", "1", "2", "3", "4"]
    assert replica_envs(2, "cuda", gpus) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                             {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert replica_envs(3, None, ["7"] * 0) == [{}, {}, {}]  # no GPU: all on the CPU
    assert replica_envs(2, "cpu") == [{}, {}]
    with pytest.raises(RuntimeError, match="--replicas 3 needs at least 3 GPUs; 2 are visible"):
        replica_envs(3, "cuda", ["0", "1"])
    with pytest.raises(RuntimeError, match="--replicas must be at least 1, got 0"):
        replica_envs(0, "cpu")


def test_slora_up_replicas_starts_a_worker_and_a_registered_scheduler_each(tmp_path):
    args = build_parser().parse_args(["up", "--replicas", "2", "--device", "cpu",
                                      "--data-dir", str(tmp_path), "--port", "0"])
    children = {c.name: c for c in build_children(args, "dummy-tiny")}
    assert set(children) == {"redis", "worker-0", "scheduler-0", "worker-1", "scheduler-1",
                             "frontend"}
    ids = set()
    for i in range(2):
        scheduler = children[f"scheduler-{i}"].args
        worker_port = flag(children[f"worker-{i}"].args, "--port")
        assert flag(scheduler, "--worker-address") == f"127.0.0.1:{worker_port}"
        assert flag(scheduler, "--redis-url").startswith("redis://127.0.0.1:")
        ids.add(flag(scheduler, "--replica-id"))
    assert ids == {"r0", "r1"}
    assert "--scheduler-address" not in children["frontend"].args  # it routes from Redis


def test_one_replica_keeps_the_frontend_s_scheduler_address(tmp_path):
    args = build_parser().parse_args(["up", "--device", "cpu", "--data-dir", str(tmp_path)])
    children = {c.name: c for c in build_children(args, "dummy-tiny")}
    assert {"worker", "scheduler", "frontend"} <= set(children)
    assert flag(children["frontend"].args, "--scheduler-address") == \
        f"127.0.0.1:{flag(children['scheduler'].args, '--port')}"


def test_slora_replica_advertises_each_scheduler_on_its_own_port():
    args = replica_launcher.build_parser().parse_args([
        "--replicas", "2", "--redis-url", "redis://r:6379/0", "--internal-secret-file", "/s",
        "--port", "50062", "--advertise-host", "10.1.2.3", "--device", "cpu",
        "--", "--model", "default", "--data-dir", "/data"])
    children = {c.name: c for c in replica_launcher.build_children(args)}
    assert set(children) == {"worker-0", "scheduler-0", "worker-1", "scheduler-1"}
    for i in range(2):
        scheduler = children[f"scheduler-{i}"].args
        assert flag(scheduler, "--port") == str(50062 + i)
        assert flag(scheduler, "--advertise-address") == f"10.1.2.3:{50062 + i}"
        worker = children[f"worker-{i}"].args
        assert flag(worker, "--model") == "default" and flag(worker, "--device") == "cpu"
        assert "--" not in worker
