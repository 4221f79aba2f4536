"""deploy/ (Kubernetes): every kustomization renders with `kubectl kustomize`, every object
validates against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are
errors; its schemas ship in the wheel, so this runs offline), and the rendered stack is the
one README promises: frontends behind a Service, each replica's scheduler and worker in one
pod with GPUs, Redis with persistence or external, adapters on a ReadWriteMany volume,
grpc.health.v1 probes, Prometheus annotations, and flags every command accepts."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBECTL = shutil.which("kubectl") or ("/usr/bin/kubectl" if os.path.exists("/usr/bin/kubectl")
                                      else None)
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/external-redis", "overlays/cpu"]

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def render(path: str) -> list[dict]:
    proc = subprocess.run([KUBECTL, "kustomize", os.path.join(ROOT, "deploy", path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize deploy/{path}: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_containers(workload: dict) -> dict[str, dict]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_validates_against_the_schemas(path):
    utils = pytest.importorskip("kubernetes_validate.utils")
    docs = render(path)
    assert docs
    for doc in docs:
        utils.validate(doc, utils.latest_version(), strict=True)


def test_the_validator_rejects_what_is_wrong():
    """The same check fails on an unknown field and on a wrong type (not a check that
    cannot fail)."""
    utils = pytest.importorskip("kubernetes_validate.utils")
    service = by_kind(render("base"), "Service")["slora"]
    bad_field = {**service, "spec": {**service["spec"], "portz": []}}
    bad_type = {**service, "spec": {**service["spec"], "ports": "50051"}}
    for doc in (bad_field, bad_type):
        with pytest.raises(Exception):
            utils.validate(doc, utils.latest_version(), strict=True)


def test_the_gpu_stack_is_the_documented_one():
    docs = render("overlays/gpu")
    frontend = by_kind(docs, "Deployment")["slora-frontend"]
    assert frontend["spec"]["replicas"] == 2
    assert by_kind(docs, "Service")["slora"]["spec"]["selector"] == \
        frontend["spec"]["template"]["metadata"]["labels"]
    replicas = by_kind(docs, "StatefulSet")["slora-replica"]
    assert replicas["spec"]["replicas"] == 4
    containers = pod_containers(replicas)
    assert set(containers) == {"worker", "scheduler"}
    assert containers["worker"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    scheduler_args = containers["scheduler"]["args"]
    for flag in ("--redis-url", "--replica-id", "--advertise-address"):
        assert flag in scheduler_args, flag
    assert scheduler_args[scheduler_args.index("--worker-address") + 1] == "127.0.0.1:50061"
    # grpc.health.v1: native grpc probes on the ports that listen on the pod's address, our
    # probe command on the worker's loopback port.
    assert containers["scheduler"]["readinessProbe"]["grpc"]["port"] == 50062
    assert pod_containers(frontend)["frontend"]["readinessProbe"]["grpc"]["port"] == 50051
    assert containers["worker"]["startupProbe"]["exec"]["command"][:5] == \
        ["python", "-P", "-m", "slora.common.healthcheck", "127.0.0.1:50061"]
    for workload in (frontend, replicas):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
    redis = by_kind(docs, "StatefulSet")["slora-redis"]
    assert "--appendonly" in pod_containers(redis)["redis"]["args"]
    assert redis["spec"]["volumeClaimTemplates"]
    assert by_kind(docs, "PersistentVolumeClaim")["slora-data"]["spec"]["accessModes"] == \
        ["ReadWriteMany"]


def test_external_redis_has_no_redis_pod_and_points_at_the_url():
    docs = render("overlays/external-redis")
    assert "slora-redis" not in by_kind(docs, "StatefulSet")
    assert "slora-redis" not in by_kind(docs, "Service")
    [config] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["data"]["REDIS_URL"].startswith("rediss://")


def test_the_cpu_overlay_requests_no_gpu():
    replicas = by_kind(render("overlays/cpu"), "StatefulSet")["slora-replica"]
    worker = pod_containers(replicas)["worker"]
    assert "nvidia.com/gpu" not in str(worker["resources"])
    assert worker["args"][worker["args"].index("--device") + 1] == "cpu"


def test_every_flag_in_the_manifests_is_one_its_command_takes():
    """Each container running `slora <command>` passes only flags that command's --help
    lists (a renamed flag would crash-loop the pod)."""
    commands = {}
    for doc in render("base"):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in pod_containers(doc).values():
                if c.get("args", [""])[0] == "slora":
                    commands[c["args"][1]] = c["args"][2:]
    assert set(commands) == {"worker", "scheduler", "frontend"}
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-P", "-m", "slora.client.cli", name, "--help"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        known = set(re.findall(r"--[a-z0-9-]+", proc.stdout))
        unknown = [a for a in args if a.startswith("--") and a not in known]
        assert not unknown, f"slora {name}: {unknown} not in its --help"
