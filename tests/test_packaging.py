"""What ships: the Docker image's package and the compose stack.

No Docker daemon is needed: the image's `pip install .` is repeated on exactly the files its
COPY lines bring in, and compose.yaml is read by a parser that validates the Compose
Specification (compose-spec).
"""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLORA_SERVICES = ("replica", "frontend")


def dockerfile_copies(path: str) -> list[tuple[str, str]]:
    """(source, destination) of each COPY line of a Dockerfile, relative paths as written."""
    copies = []
    with open(path) as f:
        for line in f:
            words = line.split()
            if words and words[0].upper() == "COPY":
                *sources, dest = [w for w in words[1:] if not w.startswith("--")]
                copies += [(src, dest) for src in sources]
    return copies


def build_context_of_the_image(dest_root: str) -> str:
    """Lays out what the Dockerfile copies into its WORKDIR, as the image's build sees it."""
    for src, dest in dockerfile_copies(os.path.join(REPO_ROOT, "Dockerfile")):
        target = os.path.join(dest_root, dest if not dest.endswith("/") and dest != "./"
                              else os.path.join(dest, os.path.basename(src)))
        from_path = os.path.join(REPO_ROOT, src)
        if os.path.isdir(from_path):
            shutil.copytree(from_path, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            shutil.copy(from_path, target)
    return dest_root


def test_the_package_builds_from_exactly_the_files_the_dockerfile_copies(tmp_path):
    """`pip install .` in the image sees only the COPY'd files: building a wheel from them
    succeeds, and the wheel holds every package pyproject declares (a folder pyproject maps
    but the Dockerfile forgets, as bench/ once was, fails here)."""
    context = build_context_of_the_image(str(tmp_path / "context"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), context], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = os.listdir(tmp_path / "dist")
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as z:
        packaged = {os.path.dirname(n).replace("/", ".") for n in z.namelist()
                    if n.endswith("__init__.py")}
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        declared = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    missing = {p for p in declared if p not in packaged and p != "slora.v1"}
    assert not missing, f"the image's package lacks {sorted(missing)}"
    assert any(n.startswith("slora/kernels/cuda/") for n in z.namelist()), "no CUDA sources"


@pytest.fixture(scope="module")
def compose() -> dict:
    compose_spec = pytest.importorskip("compose_spec")
    with open(os.path.join(REPO_ROOT, "compose.yaml")) as f:
        return compose_spec.PyCompose.from_yaml(f.read()).to_dict()


def test_compose_yaml_is_a_valid_compose_file(compose):
    """The Compose Specification's own rules accept it, with every service of the stack."""
    assert {"redis", *SLORA_SERVICES} <= set(compose["services"]), compose["services"].keys()


@pytest.mark.parametrize("name", ["redis", *SLORA_SERVICES])
def test_every_compose_service_restarts_and_has_a_healthcheck(compose, name):
    """A service that dies is restarted, and its health is probed (what the README says)."""
    service = compose["services"][name]
    assert service.get("restart") in ("always", "unless-stopped"), service
    assert service.get("healthcheck", {}).get("test"), service


@pytest.mark.parametrize("name", SLORA_SERVICES)
def test_the_slora_healthchecks_probe_grpc_health_on_the_service_port(compose, name):
    """Each slora service's probe is our grpc.health.v1 probe, aimed at the port the
    service's command listens on."""
    service = compose["services"][name]
    probe = service["healthcheck"]["test"]
    assert probe[:5] == ["CMD", "python", "-P", "-m", "slora.common.healthcheck"], probe
    command = service["command"]
    port = command[command.index("--port") + 1]
    assert probe[5] == f"127.0.0.1:{port}", (probe, command)


def test_the_probe_exits_zero_only_for_a_serving_server():
    """The probe against a real grpc.health.v1 server: 0 for SERVING, 1 for NOT_SERVING,
    for an unknown service and for a port nobody listens on."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)

        def probe(*args):
            return subprocess.run(
                [sys.executable, "-P", "-m", "slora.common.healthcheck", *args,
                 "--timeout-s", "2"], capture_output=True, text=True, timeout=60)

        ok = probe(f"127.0.0.1:{port}")
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok
        assert probe(f"127.0.0.1:{port}", "--service", "down").returncode == 1
        assert probe(f"127.0.0.1:{port}", "--service", "nope").returncode == 1
    finally:
        server.stop(0)
    assert probe(f"127.0.0.1:{port}").returncode == 1


def test_the_worker_answers_its_health_probe(tmp_path):
    """compose's probe of a replica (`slora.common.healthcheck` on a port) works against a
    real worker: SERVING once it listens."""
    from helpers_peft import make_tiny_llama
    from helpers_procs import slora_module, start_process, stop_process
    from helpers_stack import PROCESS_ENV, worker_argv

    base = make_tiny_llama(str(tmp_path / "base"), num_kv_heads=2, seed=3)
    proc, port = start_process(slora_module("slora.worker.server", *worker_argv(base),
                                            "--internal-secret-file",
                                            str(tmp_path / "internal.secret")),
                               "SLORA_READY", env=PROCESS_ENV)
    try:
        probe = subprocess.run(
            [sys.executable, "-P", "-m", "slora.common.healthcheck", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe
    finally:
        stop_process(proc)
