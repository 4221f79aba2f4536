"""Prometheus metrics over HTTP, one endpoint per process (prometheus-client).

Every process serves its metrics on `--metrics-host:--metrics-port` (default loopback, a free
port, printed as `metrics_port=N` on its SLORA_READY line; -1 turns the endpoint off). Each
process defines its own metrics beside its code (frontend/metrics.py, scheduler/metrics.py,
worker/metrics.py); this module holds what they share: the HTTP server, the bucket
boundaries, and a collector that reads a stats dict at scrape time. All names start with
`slora_`; no metric has an adapter label (thousands of adapters would mean thousands of
series). The default registry also exports the process's own `process_*` metrics
(resident memory, CPU seconds, open files).

The HTTP server is ours, around prometheus-client's WSGI app: prometheus-client's own
`start_http_server` starts one thread per connection and waits forever for a request on
it, so idle connections pile up threads. Here at most METRICS_MAX_THREADS connections are
served at once (the next wait in the listen backlog), and a connection that sends no
complete request within METRICS_READ_TIMEOUT_S is closed. A port in use is an error naming
it (the socket never sets SO_REUSEPORT).
"""
from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from slora.common.errors import ConfigError

METRICS_OFF = -1
"""--metrics-port value that serves no metrics (also what `start_metrics_server` returns)."""
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)
"""Request latencies (time to first token, total), seconds."""
TOKEN_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                   1.28)
"""Per-token and per-step times, seconds."""
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
METRICS_MAX_THREADS = 8
"""Connections of the metrics endpoint served at once."""
METRICS_READ_TIMEOUT_S = 2.0
"""A connection's request must arrive within this (a Prometheus scrape sends it at once)."""


def add_metrics_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the Prometheus metrics endpoint")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="port of the Prometheus metrics endpoint (0: any free port, "
                             "printed as metrics_port=N on the SLORA_READY line; -1: off)")


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_READ_TIMEOUT_S
    """socketserver sets it on the connection: a read that waits longer ends it."""

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass  # one line per scrape on stderr would drown the JSON logs


class BoundedMetricsServer(WSGIServer):
    """One thread per connection, at most `max_threads` at once; the accept loop waits for
    a free one. Never SO_REUSEPORT (socketserver's allow_reuse_port stays False)."""

    allow_reuse_address = True  # only lets a restart bind over TIME_WAIT connections
    daemon_threads = True

    def __init__(self, address, max_threads: int = METRICS_MAX_THREADS):
        super().__init__(address, _QuietHandler)
        self._slots = threading.BoundedSemaphore(max_threads)

    def process_request(self, request, client_address):
        self._slots.acquire()
        threading.Thread(target=self._serve_one, args=(request, client_address),
                         name="slora-metrics-conn", daemon=True).start()

    def _serve_one(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out or went away: nothing to report


def start_metrics_server(host: str, port: int) -> int:
    """Serves the default registry at http://host:port/metrics from a daemon thread; returns
    the bound port, or METRICS_OFF when `port` is negative. A port in use: ConfigError."""
    if port < 0:
        return METRICS_OFF
    try:
        server = BoundedMetricsServer((host, port))
    except OSError as e:
        raise ConfigError(f"metrics: cannot listen on {host}:{port}: {e.strerror} (another "
                          "slora stack, or another program? --metrics-port 0 picks a free "
                          "port)") from None
    server.set_app(make_wsgi_app(REGISTRY))
    threading.Thread(target=server.serve_forever, name="slora-metrics", daemon=True).start()
    return server.server_address[1]


@dataclass(frozen=True)
class StatSpec:
    """One metric read from a stats dict: `key` of the dict, or one sample per label value
    when `label_keys` maps label values to keys."""

    name: str
    doc: str
    kind: str = "gauge"
    """gauge or counter (a counter's value must only grow)."""
    key: str = ""
    label: str = ""
    label_keys: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0
    """Multiplies the value (microseconds in a stats dict of ints -> seconds: 1e-6)."""


class StatsCollector(Collector):
    """Exports `read()`'s values at each scrape. `read` runs on the HTTP server's thread: it
    must only read plain counters (ints, lengths), never iterate a structure that the
    serving thread changes."""

    def __init__(self, read: Callable[[], dict[str, float]], specs: list[StatSpec]):
        self.read, self.specs = read, specs

    def describe(self):
        return []  # the names are known only once read() runs; skip the registry's check

    def collect(self):
        values = self.read()
        for spec in self.specs:
            family = (CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily)(
                spec.name, spec.doc, labels=[spec.label] if spec.label else None)
            if spec.label:
                for label_value, key in spec.label_keys:
                    family.add_metric([label_value], values.get(key, 0) * spec.scale)
            else:
                family.add_metric([], values.get(spec.key, 0) * spec.scale)
            yield family


def register_stats(read: Callable[[], dict[str, float]], specs: list[StatSpec]) -> None:
    REGISTRY.register(StatsCollector(read, specs))
