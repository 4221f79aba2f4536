"""bench/routing_sim.py: the real router over a discrete-event model of replicas. Small
runs: every request finishes, adapter affinity loads fewer adapters than round-robin and
least-loaded on the same requests, and the step model follows the measured table."""
from __future__ import annotations

import math

import pytest

from slora.bench.routing_sim import DECODE_STEP_MS, SimConfig, decode_step_s, main, simulate


def test_decode_step_follows_the_measured_table_between_and_past_its_rows():
    assert decode_step_s(1) == pytest.approx(DECODE_STEP_MS[0][1] / 1000)
    assert decode_step_s(64) == pytest.approx(13.67e-3)
    assert 10.28e-3 < decode_step_s(48) < 13.67e-3
    assert decode_step_s(512) > decode_step_s(256)


def test_affinity_loads_fewer_adapters_than_the_baselines_on_the_same_requests():
    cfg = SimConfig(num_replicas=4, num_adapters=400, rate=30.0, duration_s=20.0,
                    max_adapter_slots=32, host_cache_adapters=64,
                    output_len=(8, 64), input_len=(8, 64))
    rows = {p: simulate(cfg, p) for p in ("adapter-affinity", "least-loaded", "round-robin")}
    for row in rows.values():
        assert math.isfinite(row["ttft_p99_s"]) and row["throughput_rps"] > 0
    affinity = rows["adapter-affinity"]["adapter_loads"]
    assert affinity < 0.8 * rows["round-robin"]["adapter_loads"], rows
    assert affinity < 0.8 * rows["least-loaded"]["adapter_loads"], rows
    assert affinity >= rows["adapter-affinity"]["distinct_adapters"]


def test_the_command_prints_a_table_and_refuses_a_bad_count(capsys):
    main(["--replicas", "2", "--duration-s", "2", "--adapters", "50", "--rate", "5"])
    out = capsys.readouterr().out
    assert out.count("| 2 |") == 3
    with pytest.raises(SystemExit):
        main(["--replicas", "0"])
