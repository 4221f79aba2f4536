"""What the serving benchmark records of a tensor-parallel run: the size, the GPUs its ranks
use, and (with --tp-profile) the worker group's collective profile (worker/tp_profile.py),
read back from the file rank 0 writes."""
from __future__ import annotations

import contextlib
import json
import os

import torch

from slora.worker.tp_profile import ENV as PROFILE_ENV

PROFILE_FILE = "tp_profile.json"


def rank_devices(device: str, size: int) -> list[str]:
    """The devices of ranks 0..size-1 (tp_group.py's rank_device), by name; on the CPU one
    entry per rank."""
    d = torch.device(device)
    if d.type != "cuda":
        return ["cpu"] * size
    first, count = d.index or 0, torch.cuda.device_count()
    return [torch.cuda.get_device_name(i) if i < count else f"cuda:{i} (missing)"
            for i in range(first, first + size)]


@contextlib.contextmanager
def profiling(out_dir: str, on: bool):
    """While open (and `on`), the processes started here profile their TP collectives into
    out_dir/tp_profile.json; yields that path (or None)."""
    if not on:
        yield None
        return
    path = os.path.abspath(os.path.join(out_dir, PROFILE_FILE))
    if os.path.exists(path):
        os.remove(path)
    old = os.environ.get(PROFILE_ENV)
    os.environ[PROFILE_ENV] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(PROFILE_ENV, None)
        else:
            os.environ[PROFILE_ENV] = old


def read_profile(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def profile_table(profile: dict | None) -> str:
    """Markdown: per step kind, the forward time per step and each collective kind's calls,
    bytes and time per step, with its share of the forward time."""
    if not profile:
        return ""
    rows = [f"Collectives per step at TP = {profile['tensor_parallel_size']} "
            f"({profile['timer']}; steps run eagerly while profiling)", "",
            "| step kind | steps | forward ms/step | collective | calls/step | KiB/step "
            "| ms/step | share of forward |", "|---|---|---|---|---|---|---|---|"]
    for kind, e in sorted(profile["step_kinds"].items()):
        n = max(e["steps"], 1)
        fwd = e["forward_s"] / n * 1e3
        for coll, c in sorted(e["collectives"].items()):
            share = c["seconds"] / e["forward_s"] if e["forward_s"] else 0.0
            rows.append(f"| {kind} | {e['steps']} | {fwd:.2f} | {coll} | {c['calls'] / n:.1f} "
                        f"| {c['bytes'] / n / 1024:.1f} | {c['seconds'] / n * 1e3:.3f} "
                        f"| {share * 100:.1f}% |")
    return "\n".join(rows)
