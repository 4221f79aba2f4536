"""bench/tp_suite.py: the issue-34 matrix, its refusal when a row needs more GPUs than are
visible, and its dry run (the whole matrix on the CPU, dummy-tiny at TP = 1 and 2, through
the serving benchmark's real stack) printing the table and the checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from slora.bench import tp_suite


def test_the_matrix_is_the_issues_and_rows_beyond_the_visible_gpus_are_refused():
    rows = tp_suite.plan_rows(tp_suite.build_parser().parse_args([]))
    assert [(r.model, r.size) for r in rows] == [
        ("dummy-llama-13b", 1), ("dummy-llama-13b", 2), ("dummy-llama-13b", 4),
        ("dummy-llama-30b", 2), ("dummy-llama-30b", 4)]
    line = tp_suite.refuse_missing_gpus(rows, 2)
    assert "dummy-llama-13b TP=4" in line and "dummy-llama-30b TP=4" in line
    assert "need(s) 4 GPUs; 2 visible" in line and "--sizes 1,2" in line
    assert "No row of this selection fits" in tp_suite.refuse_missing_gpus(rows, 0)
    assert tp_suite.refuse_missing_gpus(rows, 4) is None
    names = [name for name, _ in tp_suite.runs_of(rows[2], dry=False)]
    assert names == ["100", "1000", "profile"]
    assert [name for name, _ in tp_suite.runs_of(rows[0], dry=False)] == ["100", "1000"]


def test_the_suite_refuses_before_running_anything_without_the_gpus(tmp_path):
    """No GPU here: every row of the real matrix needs one; exit 2 with the line, nothing
    written."""
    proc = subprocess.run([sys.executable, "-m", "slora.bench.tp_suite", "--sizes", "2",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert "need(s) 2 GPUs; 0 visible" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_checks_of_a_full_matrix_read_the_rows():
    def row(model, n, base, s1, lora):
        return {"model": model, "tensor_parallel_size": n, "gpus": ["H100"] * n, "errors": [],
                "output_tokens_per_s": {"base (no adapters)": base, "S1 1000 adapters": s1},
                "lora_share": lora, "base_share": 0.2}
    rows = [row("dummy-llama-13b", 4, 1000.0, 900.0, 0.05),
            row("dummy-llama-30b", 2, 400.0, 300.0, 0.04),
            row("dummy-llama-30b", 4, 800.0, 700.0, 0.12)]
    got = {c: (o, v) for c, o, v in tp_suite.checks(rows)}
    assert got["dummy-llama-13b TP=4: S1 1000 adapters vs base >= 85%"] == ("90.0%", "met")
    assert got["dummy-llama-30b TP=4: LoRA comm <= 10% of a decode step"] == ("12.0%", "MISSED")
    assert got["dummy-llama-30b TP 2 -> 4: S1 1000 adapters throughput >= 2x"] == (
        "2.33x", "met")
    missing = {c: v for c, _, v in tp_suite.checks(rows[1:2])}
    assert missing["dummy-llama-30b TP 2 -> 4: S1 1000 adapters throughput >= 2x"] == "not run"


@pytest.mark.slow
def test_dry_run_runs_the_whole_matrix_on_the_cpu_and_prints_the_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "slora.bench.tp_suite", "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "tp_suite.json") as f:
        rows = json.load(f)["rows"]
    assert [r["tensor_parallel_size"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["output_tokens_per_s"]) == set(tp_suite.SETTINGS), r
        assert all(v > 0 for v in r["output_tokens_per_s"].values())
        assert r["gpus"] == ["cpu"] * r["tensor_parallel_size"] and not r["errors"]
    assert rows[0]["decode_profile"] is None
    decode = rows[1]["decode_profile"]
    assert decode["steps"] > 0 and 0 < rows[1]["lora_share"] < 1
    assert decode["collectives"]["lora"]["calls"] > 0
    assert decode["collectives"]["base"]["calls"] == 2 * 2 * decode["steps"]  # 2 layers
    out = proc.stdout
    assert "| model | TP | GPUs | setting | out tok/s | vs base | LoRA comm / step" in out
    assert out.count("| dummy-tiny |") == 2 * len(tp_suite.SETTINGS)
    assert "| dummy-tiny TP=2: LoRA comm <= 10% of a decode step |" in out
    assert (tmp_path / "tp_suite.md").read_text().strip() == out.strip()
