"""The gRPC channel arguments of slora's servers and internal channels, in one place, and
how every listener binds its port.

Channel arguments are plain strings that gRPC core ignores when it does not know them, so a
misspelt one fails silently (the worker once set a ping option that does not exist, and
answered the scheduler's keepalive pings with GOAWAY "too_many_pings" after about 80 s of
idle stream). Every name here is one of grpc core's (include/grpc/impl/channel_arg_names.h);
tests/test_grpc_options.py checks each option in the tree against that list.

Keepalive. The scheduler pings its worker (and a frontend its scheduler) every
`keepalive_s` while a stream is open, so that a peer whose host vanished (no TCP reset) is
found within keepalive + KEEPALIVE_TIMEOUT_MS. A gRPC server counts a ping that comes
sooner than `grpc.http2.min_ping_interval_without_data_ms` after the last one, with no data
in between, as a strike, and after `grpc.http2.max_ping_strikes` (2) closes the connection.
So our servers permit pings every MIN_PING_INTERVAL_MS, and clients may not ping more often
than MIN_KEEPALIVE_S (twice that: a timer's jitter never makes a ping look early).

Ports. gRPC sets SO_REUSEPORT on its listeners by default, so a second server on a port in
use binds silently and the kernel splits connections between the two. Every slora server
turns it off (`grpc.so_reuseport` 0), and `listen` turns gRPC's bind failure into an error
that names the address.
"""
from __future__ import annotations

import grpc

from slora.common.errors import ConfigError

MAX_MESSAGE_BYTES = 64 << 20
"""Step commands and Submit requests carry whole prompts."""
MIN_PING_INTERVAL_MS = 500
"""Servers accept a keepalive ping this often on a stream without data."""
MIN_KEEPALIVE_S = 1.0
"""The shortest keepalive interval a client of ours may be configured with."""
DEFAULT_KEEPALIVE_S = 10.0
KEEPALIVE_TIMEOUT_MS = 5_000
"""A ping not answered within this ends the connection."""
RECONNECT_OPTIONS = [
    # A restarted peer is found within a second (the default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of every slora gRPC server."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def check_keepalive_s(keepalive_s: float, flag: str) -> float:
    if not keepalive_s >= MIN_KEEPALIVE_S:
        raise ConfigError(f"{flag} is {keepalive_s:g} s; it must be at least "
                          f"{MIN_KEEPALIVE_S:g} s (servers refuse pings more often than every "
                          f"{MIN_PING_INTERVAL_MS} ms)")
    return keepalive_s


def internal_channel_options(keepalive_s: float = DEFAULT_KEEPALIVE_S,
                             max_message_bytes: int = MAX_MESSAGE_BYTES
                             ) -> list[tuple[str, int]]:
    """Options of a channel between slora's own processes (scheduler -> worker,
    frontend -> scheduler): large messages, keepalive, quick reconnects."""
    check_keepalive_s(keepalive_s, "keepalive")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging a stream that is idle for long (by default core stops after 2 pings
        # without data, and a vanished peer would then go unnoticed).
        ("grpc.http2.max_pings_without_data", 0),
        *RECONNECT_OPTIONS,
    ]


def listen(server: grpc.aio.Server, who: str, host: str, port: int,
           credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds `host:port` (TLS with `credentials`); returns the bound port. A port in use, or
    an address not of this machine: ConfigError naming it."""
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpcio >= 1.50 raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise ConfigError(f"{who}: cannot listen on {address}: the port is in use (another "
                          "slora stack, or another program?) or the address is not this "
                          "machine's")
    return bound
