"""`slora up` as a newcomer runs it, and compose.yaml's commands."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

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
