"""Prometheus metrics over HTTP, one endpoint per process (prometheus-client).

Every process serves its metrics on `--metrics-host:--metrics-port` (default loopback, a free
port, printed as `metrics_port=N` on its SLORA_READY line; -1 turns the endpoint off). Each
process defines its own metrics beside its code (frontend/metrics.py, scheduler/metrics.py,
worker/metrics.py); this module holds what they share: the HTTP server, the bucket
boundaries, and a collector that reads a stats dict at scrape time. All names start with
`slora_`; no metric has an adapter label (thousands of adapters would mean thousands of
series). The default registry also exports the process's own `process_*` metrics
(resident memory, CPU seconds, open files).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

METRICS_OFF = -1
"""--metrics-port value that serves no metrics (also what `start_metrics_server` returns)."""
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)
"""Request latencies (time to first token, total), seconds."""
TOKEN_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                   1.28)
"""Per-token and per-step times, seconds."""
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def add_metrics_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the Prometheus metrics endpoint")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="port of the Prometheus metrics endpoint (0: any free port, "
                             "printed as metrics_port=N on the SLORA_READY line; -1: off)")


def start_metrics_server(host: str, port: int) -> int:
    """Serves the default registry at http://host:port/metrics from a daemon thread; returns
    the bound port, or METRICS_OFF when `port` is negative."""
    if port < 0:
        return METRICS_OFF
    server, _thread = start_http_server(port, addr=host)
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
