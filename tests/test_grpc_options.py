"""Every gRPC channel argument in the tree is one that gRPC core knows: core ignores a name it
does not know, so a misspelt option fails silently (the worker's made-up
`grpc.http2.min_recv_ping_interval_without_data_ms` left the default ping policy on, and
the worker closed the scheduler's idle stream with GOAWAY "too_many_pings")."""
from __future__ import annotations

import ast
import os

from slora.common import grpc_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv"}

GRPC_CORE_ARG_NAMES = frozenset("""
grpc.census grpc.loadreporting grpc.server_call_metric_recording grpc.minimal_stack
grpc.max_concurrent_streams grpc.max_receive_message_length grpc.max_send_message_length
grpc.max_connection_idle_ms grpc.max_connection_age_ms grpc.max_connection_age_grace_ms
grpc.client_idle_timeout_ms grpc.per_message_compression grpc.per_message_decompression
grpc.http2.initial_sequence_number grpc.http2.lookahead_bytes
grpc.http2.hpack_table_size.decoder grpc.http2.hpack_table_size.encoder
grpc.http2.max_frame_size grpc.http2.bdp_probe grpc.http2.min_time_between_pings_ms
grpc.http2.min_ping_interval_without_data_ms grpc.server_max_unrequested_time_in_server
grpc.http2_scheme grpc.http2.max_pings_without_data grpc.http2.max_ping_strikes
grpc.http2.write_buffer_size grpc.http2.true_binary grpc.keepalive_time_ms
grpc.keepalive_timeout_ms grpc.keepalive_permit_without_calls grpc.default_authority
grpc.primary_user_agent grpc.secondary_user_agent grpc.min_reconnect_backoff_ms
grpc.max_reconnect_backoff_ms grpc.initial_reconnect_backoff_ms
grpc.dns_min_time_between_resolutions_ms grpc.server_handshake_timeout_ms
grpc.ssl_target_name_override grpc.ssl_session_cache grpc.tsi.max_frame_size
grpc.max_metadata_size grpc.absolute_max_metadata_size grpc.so_reuseport
grpc.resource_quota grpc.expand_wildcard_addrs grpc.service_config
grpc.service_config_disable_resolution grpc.lb_policy_name grpc.enable_channelz
grpc.tcp_receive_buffer_size grpc.enable_retries grpc.per_rpc_retry_buffer_size
grpc.enable_http_proxy grpc.http_proxy grpc.use_local_subchannel_pool
grpc.max_allowed_incoming_connections
""".split())
"""Names from grpc core's include/grpc/impl/channel_arg_names.h (the ones a server or a
channel of ours could plausibly set)."""


def option_names_in_tree() -> dict[str, list[str]]:
    """Each ("grpc.<name>", value) pair in our Python files -> where it is."""
    found: dict[str, list[str]] = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if not name.endswith(".py") or name.endswith("_pb2_grpc.py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Tuple) and len(node.elts) == 2 and \
                        isinstance(node.elts[0], ast.Constant) and \
                        isinstance(node.elts[0].value, str) and \
                        node.elts[0].value.startswith("grpc."):
                    found.setdefault(node.elts[0].value, []).append(
                        f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    return found


def test_every_grpc_option_in_the_tree_is_a_real_channel_argument():
    found = option_names_in_tree()
    assert "grpc.keepalive_time_ms" in found, "the scan found none of our options"
    unknown = {name: where for name, where in found.items()
               if name not in GRPC_CORE_ARG_NAMES}
    assert not unknown, f"not gRPC channel arguments: {unknown}"


def test_servers_refuse_shared_ports_and_permit_the_clients_pings():
    """Every server turns SO_REUSEPORT off and accepts pings at least as often as the
    fastest keepalive a client of ours may be set to."""
    options = dict(grpc_options.server_options())
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] * 2 <= \
        grpc_options.MIN_KEEPALIVE_S * 1000
    client = dict(grpc_options.internal_channel_options(grpc_options.MIN_KEEPALIVE_S))
    assert client["grpc.keepalive_time_ms"] >= \
        options["grpc.http2.min_ping_interval_without_data_ms"]
