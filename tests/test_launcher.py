"""`slora up` as a newcomer runs it, and compose.yaml's commands."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_compose_command_is_a_real_entry_point():
    """Each service built from our image runs `slora <service> ...`, and that command with
    --help exits 0 (for the replica service, its workers' flags too, as `slora worker`);
    each has the internal secret of the shared volume; the Redis service is the official
    image with append-only files and a password."""
    with open(os.path.join(ROOT, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    ours = {name: s for name, s in compose["services"].items() if "build" in s}
    assert set(ours) == {"replica", "frontend"}
    for name, service in ours.items():
        command = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in service["command"]]
        assert command[:2] == ["slora", name], f"{name}: {command}"
        own, rest = (command[1:command.index("--")], command[command.index("--") + 1:]) \
            if "--" in command else (command[1:], None)
        runs = [own] + ([["worker", *rest]] if rest is not None else [])
        for args in runs:
            proc = subprocess.run([sys.executable, "-P", "-m", "slora.client.cli", *args, "--help"],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
            assert "usage" in proc.stdout.lower()
            known = set(re.findall(r"--[a-z0-9-]+", proc.stdout))
            assert not [a for a in args if a.startswith("--") and a not in known], (name, args)
    redis = compose["services"]["redis"]
    script = " ".join(redis["command"])
    assert redis["image"].startswith("redis:") and "--appendonly yes" in script
    assert "requirepass" in script, "Redis without a password"
    secret = ["--internal-secret-file", "/data/internal.secret"]
    for name, service in ours.items():
        command = service["command"]
        assert any(command[i:i + 2] == secret for i in range(len(command))), \
            f"{name} without the internal secret"
        assert "slora-data:/data" in service["volumes"], name
    assert "--redis-password-file" in ours["frontend"]["command"]


@pytest.mark.parametrize("flags, strict", [([], False), (["--strict-base-model"], True)])
def test_up_passes_strict_base_model_to_the_frontend(flags, strict, tmp_path):
    """`slora up --strict-base-model` starts the frontend with the flag, which its own
    parser reads; without it the frontend's check stays lenient."""
    from slora.client.cli import build_parser
    from slora.client.launcher import build_children
    from slora.frontend.server import build_parser as frontend_parser

    args = build_parser().parse_args(["up", "--data-dir", str(tmp_path), *flags])
    frontend = next(c for c in build_children(args, "dummy-tiny") if c.name == "frontend")
    assert frontend.args[0] == "slora.frontend.server"
    assert frontend_parser().parse_args(frontend.args[1:]).strict_base_model is strict


def readme_first_command() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_without_a_server_says_how_to_start_one():
    """A call to an address where nothing listens: UNAVAILABLE, exit 1, and a hint that
    names the address and `slora up`, without a traceback."""
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-P", "-m", "slora.client.cli", "generate", "Hi",
                           "--address", address, "--api-key", "none"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "UNAVAILABLE" in proc.stderr and "Traceback" not in proc.stderr
    assert f"is the server up at {address}? `slora up` starts one" in proc.stderr


@pytest.mark.slow
def test_readme_first_command_serves_smollm2_that_knows_paris(tmp_path):
    """The README's first command, run as written (with a fresh HOME and a free port),
    starts the stack on SmolLM2-135M-Instruct; `slora generate --chat` streams the answer
    transformers gives on the same GGUF; `slora demo-adapters` writes adapters for that model
    and registers them; Ctrl-C stops every service."""
    from slora.common.errors import ConfigError
    from slora.models.gguf_convert import find_smollm2_gguf
    try:
        find_smollm2_gguf()
    except ConfigError as e:
        pytest.skip(str(e))
    command = readme_first_command()
    assert command.endswith("slora up")
    port, http_port = free_port(), free_port()
    env = {**os.environ, "HOME": str(tmp_path), "SLORA_PORT": str(port),
           "SLORA_HTTP_PORT": str(http_port), "SLORA_ADDRESS": f"127.0.0.1:{port}",
           "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "up.log", "w+")
    up = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "slora is serving" not in open(tmp_path / "up.log").read():
            assert up.poll() is None, open(tmp_path / "up.log").read()[-3000:]
            assert time.monotonic() < deadline, "slora up did not start in 600 s"
            time.sleep(0.5)
        gen = subprocess.run(["slora", "generate", "--chat", "What is the capital of France?"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.strip() == "The capital of France is Paris.", gen.stdout
        # The same answer through the OpenAI API, the model's chat template on the server.
        assert f"OpenAI API at http://127.0.0.1:{http_port}/v1" in open(tmp_path / "up.log").read()
        import openai

        with open(tmp_path / ".slora" / "admin.key") as f:
            oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1",
                                api_key=f.read().strip(), max_retries=0)
        model = oai.models.list().data[0].id
        answer = oai.chat.completions.create(
            model=model, temperature=0, max_tokens=32,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert answer.choices[0].message.content.strip() == "The capital of France is Paris."
        # The demo adapters default to the model `slora up` serves, and register with it.
        demo = subprocess.run(["slora", "demo-adapters", "3"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert demo.returncode == 0, demo.stderr
        assert os.path.isdir(tmp_path / ".slora" / "demo-adapters" / "demo-2"), demo.stdout
        gen = subprocess.run(["slora", "generate", "--adapter", "demo-1", "--max-new-tokens",
                              "4", "Hi"], env=env, capture_output=True, text=True, timeout=300)
        assert gen.returncode == 0, gen.stderr
        # A reader that has gone (`slora adapters list | head`) ends the CLI without a trace.
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            listed = subprocess.run(["slora", "adapters", "list"], env=env, stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, timeout=300)
        finally:
            os.close(write_end)
        assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)
    out = open(tmp_path / "up.log").read()
    assert "slora: stopped" in out, out[-3000:]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the frontend still listens"


def free_port_run(length: int) -> int:
    """A port N such that N .. N+length-1 are all free now."""
    while True:
        base = free_port()
        try:
            for offset in range(1, length):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue


def wait_for_text(path, text: str, proc: subprocess.Popen, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (out := open(path).read()):
        assert proc.poll() is None, out[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{out[-3000:]}"
        time.sleep(0.1)
    return out


def test_up_fixed_metrics_ports_text_logs_and_a_second_ctrl_c(tmp_path):
    """`slora up --metrics-port N --log-format text` on a tiny model: each service's metrics
    answer at N (frontend), N+1 (scheduler), N+2 (worker); the services log text, not JSON;
    every line printed stands alone (the ready lines end with newlines). Ctrl-C while a
    request is stuck (the scheduler paused) prints the draining line; a second Ctrl-C ends
    the stack, every child included, within 2 s."""
    from helpers_peft import make_tiny_llama
    from slora.client import Client, SloraClientError
    from slora.client.launcher import DRAINING_LINE
    from slora.common.internal_auth import SECRET_FILE_NAME, call_metadata, load_or_create_secret
    from slora.v1 import scheduler_pb2, scheduler_pb2_grpc

    base = make_tiny_llama(str(tmp_path / "base"), num_kv_heads=2, seed=4)
    metrics_port = free_port_run(3)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-P", "-m", "slora.client.cli", "up", "--model", base,
         "--data-dir", str(tmp_path / "data"), "--port", "0", "--device", "cpu",
         "--dtype", "float32", "--num-pages", "1024", "--max-lora-rank", "8",
         "--max-model-len", "96", "--metrics-port", str(metrics_port),
         "--log-format", "text"],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = wait_for_text(log_path, "slora: Prometheus metrics at", up)
        lines = out.splitlines()
        assert any(line.startswith("slora is serving") for line in lines), out[-3000:]
        for line in lines:
            assert "SLORA_READY" not in line or re.match(r"\[\w+\] SLORA_READY", line), line
            assert "slora is serving" not in line or line.startswith("slora is serving"), line
        for name, offset, metric in (("frontend", 0, "slora_scheduler_available"),
                                     ("scheduler", 1, "slora_queue_depth"),
                                     ("worker", 2, "slora_worker_step_time_seconds")):
            url = f"http://127.0.0.1:{metrics_port + offset}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert metric in response.read().decode(), f"{name} at {url}"
        service_lines = [line for line in lines if re.match(r"\[(worker|scheduler|frontend)\]",
                                                            line) and "SLORA_READY" not in line]
        assert service_lines and not any(line.split("] ", 1)[1].startswith("{")
                                         for line in service_lines), service_lines[:5]
        ports = dict(re.findall(r"\[(\w+)\] SLORA_READY \w+ port=(\d+)", out))
        pids = [int(p) for p in re.findall(r"SLORA_READY \w+ port=\d+ .*?pid=(\d+)", out)]
        assert len(pids) == 3, out[-3000:]
        frontend = re.search(r"slora is serving \S+ on (\S+)", out).group(1)

        internal = call_metadata(load_or_create_secret(str(tmp_path / "data" / SECRET_FILE_NAME)))
        with grpc.insecure_channel(f"127.0.0.1:{ports['scheduler']}") as channel:
            scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
            scheduler.Pause(scheduler_pb2.PauseRequest(paused=True), timeout=10,
                            metadata=internal)
            client = Client(frontend, api_key=(tmp_path / "data" / "admin.key").read_text().strip(),
                            retries=0)
            def stuck_request():
                with contextlib.suppress(SloraClientError):
                    list(client.stream([5, 6], max_new_tokens=4))

            stuck = threading.Thread(target=stuck_request, daemon=True)
            stuck.start()
            deadline = time.monotonic() + 30
            while dict(scheduler.Stats(scheduler_pb2.StatsRequest(), timeout=10,
                                       metadata=internal).values).get("num_waiting", 0) < 1:
                assert time.monotonic() < deadline, "the stuck request never reached the queue"
                time.sleep(0.05)
        os.kill(up.pid, signal.SIGINT)
        wait_for_text(log_path, DRAINING_LINE, up, timeout_s=10)
        time.sleep(0.5)  # a human's second Ctrl-C comes later; the drain is under way
        assert up.poll() is None, "the stack stopped before the second Ctrl-C"
        start = time.monotonic()
        os.kill(up.pid, signal.SIGINT)
        up.wait(10)
        seconds = time.monotonic() - start
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    assert seconds < 2.0, f"the second Ctrl-C took {seconds:.2f} s:\n" + open(log_path).read()[-3000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "slora: stopped" in open(log_path).read()
    print(f"FIGURE slora up: second Ctrl-C ended the stack in {seconds:.2f} s")


def test_up_log_format_auto_is_json_off_a_terminal_and_metrics_ports_follow_n(tmp_path,
                                                                            monkeypatch):
    """`--log-format auto` gives the services JSON when stdout is not a terminal (as here,
    under pytest) and text when it is; `--metrics-port 9100` gives 9100, 9101, 9102 to the
    frontend, the scheduler and the worker; without it each takes a free port (0)."""
    from slora.client.cli import build_parser
    from slora.client.launcher import build_children

    def flags(argv: list[str], tty: bool) -> dict[str, tuple[str, str]]:
        args = build_parser().parse_args(["up", "--data-dir", str(tmp_path), *argv])
        monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
        children = build_children(args, "dummy-tiny")
        out = {}
        for child in children:
            if child.name != "redis":
                out[child.name] = tuple(child.args[child.args.index(f) + 1]
                                        for f in ("--log-format", "--metrics-port"))
        return out

    assert flags([], tty=False) == {n: ("json", "0") for n in ("worker", "scheduler", "frontend")}
    assert {f for f, _ in flags([], tty=True).values()} == {"text"}
    assert flags(["--metrics-port", "9100", "--log-format", "json"], tty=True) == {
        "frontend": ("json", "9100"), "scheduler": ("json", "9101"), "worker": ("json", "9102")}
