"""The tensor-parallel experiment (issue 34; the paper's section 6) on one machine kind, as
runs of the serving benchmark (`python -m slora.bench.serving --tensor-parallel-size N`),
and its table.

    python -m slora.bench.tp_suite --out DIR          # every row: dummy Llama-2-13B on 1, 2
                                                      # and 4 GPUs, the 30B shape on 2 and 4
    python -m slora.bench.tp_suite --sizes 1,2 --out DIR   # the rows a 2-GPU machine holds
    python -m slora.bench.tp_suite --dry-run --out DIR     # the whole matrix on the CPU:
                                                      # dummy-tiny at TP = 1 and 2, tiny loads

Each row (a model at a TP size) is three runs of the serving benchmark, each its own stack:
1. base, S1 (rank 8) and S2 (ranks 64/32/16/8) with 100 adapters;
2. S1 and S2 with 1,000 adapters;
3. at TP > 1, S1 with 1,000 adapters again with --tp-profile: every collective timed per
   step kind (worker/tp_profile.py; eager steps, so its throughput is not reported).
The table gives each setting's throughput, its share of the row's base throughput, and per
row the decode steps' LoRA and base collective time as a share of the forward pass. The
checks of the issue follow: S1 with 1,000 adapters >= 85% of base at TP = 4, LoRA
communication <= 10% of the step at TP = 4, the 30B shape's throughput from 2 to 4 GPUs
>= 2x. A row that needs more GPUs than are visible is refused before anything runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass

MODELS = {"13b": "dummy-llama-13b", "30b": "dummy-llama-30b"}
ROWS = [("13b", 1), ("13b", 2), ("13b", 4), ("30b", 2), ("30b", 4)]
"""The issue's matrix: (model, tensor-parallel size)."""
COUNTS = (100, 1000)
S1_TARGET, LORA_COMM_TARGET, SCALING_TARGET = 0.85, 0.10, 2.0
DRY_MODEL = "dummy-tiny"
DRY_SIZES = (1, 2)
DRY_FLAGS = ["--device", "cpu", "--num-requests", "6", "--rate", "100000",
             "--input-range", "4", "16", "--output-range", "4", "8", "--warmup-requests", "1",
             "--max-num-seqs", "4"]
"""A dry run's workload: enough for every phase and every table, not for figures."""
SETTINGS = ["base (no adapters)"] + [f"{p} {n} adapters" for n in COUNTS for p in ("S1", "S2")]


@dataclass
class Row:
    model: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.model} TP={self.size}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slora.bench.tp_suite",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tp-suite-out")
    p.add_argument("--sizes", default=None,
                   help="comma-separated TP sizes of the matrix to run (default: every row)")
    p.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--dry-run", action="store_true",
                   help=f"{DRY_MODEL} on the CPU at TP = {', '.join(map(str, DRY_SIZES))} "
                        "with a tiny workload: the commands, runs and table, no figures")
    p.add_argument("--serving-args", default="",
                   help="more flags for every serving run (e.g. '--num-requests 2000')")
    return p


def plan_rows(args) -> list[Row]:
    if args.dry_run:
        return [Row(DRY_MODEL, n) for n in DRY_SIZES]
    sizes = None if args.sizes is None else {int(s) for s in args.sizes.split(",") if s}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"tp_suite: unknown model {m!r}; one of {', '.join(MODELS)}")
    return [Row(MODELS[m], n) for m, n in ROWS if m in models and (sizes is None or n in sizes)]


def refuse_missing_gpus(rows: list[Row], visible: int) -> str | None:
    """The refusal line when a row needs more GPUs than are visible, else None."""
    short = [r for r in rows if r.size > visible]
    if not short:
        return None
    line = (f"tp_suite: {', '.join(r.name for r in short)} need(s) "
            f"{max(r.size for r in short)} GPUs; {visible} visible.")
    fit = sorted({r.size for r in rows if r.size <= visible})
    return line + (f" Run the rows this machine holds with --sizes {','.join(map(str, fit))}"
                   if fit else " No row of this selection fits this machine.")


def runs_of(row: Row, dry: bool) -> list[tuple[str, list[str]]]:
    """(part name, serving flags) of a row's runs."""
    base = ["--model", row.model, "--tensor-parallel-size", str(row.size),
            "--presets", "S1,S2", "--adapter-counts", "", "--skip", "inprocess,peft"]
    small, large = COUNTS
    runs = [("100", base + ["--num-adapters", str(small)]),
            ("1000", base[:-1] + ["inprocess,peft,base", "--num-adapters", str(large)])]
    if row.size > 1:
        runs.append(("profile", ["--model", row.model, "--tensor-parallel-size", str(row.size),
                                 "--presets", "S1", "--adapter-counts", "", "--skip",
                                 "inprocess,peft,base", "--num-adapters", str(large),
                                 "--tp-profile"]))
    return [(name, flags + (DRY_FLAGS if dry else [])) for name, flags in runs]


def run_serving(flags: list[str], out_dir: str) -> dict:
    """One serving benchmark run in its own process; its serving.json (errors recorded)."""
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "slora.bench.serving", *flags, "--out", out_dir]
    print(f"[tp_suite] $ python {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    with open(os.path.join(out_dir, "serving.log"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    path = os.path.join(out_dir, "serving.json")
    if not os.path.exists(path):
        return {"errors": [f"exit status {proc.returncode}, no serving.json; see "
                           f"{out_dir}/serving.log"], "results": []}
    with open(path) as f:
        return json.load(f)


def collect(row: Row, parts: dict[str, dict]) -> dict:
    """One row's figures: throughput per setting, the decode collectives' shares, errors."""
    tput, gpus, errors = {}, [], []
    for name, payload in parts.items():
        errors += [f"{name}: {e}" for e in payload.get("errors", [])]
        gpus = gpus or payload.get("gpus", [])
        if name == "profile":
            continue
        for r in payload.get("results", []):
            if r["via"] == "grpc" and r["name"] in SETTINGS:
                tput[r["name"]] = r["metrics"]["output_tokens_per_s"]
    decode = ((parts.get("profile") or {}).get("tp_profile") or {}).get(
        "step_kinds", {}).get("decode")
    return {"model": row.model, "tensor_parallel_size": row.size, "gpus": gpus,
            "output_tokens_per_s": tput, "errors": errors,
            "lora_share": decode["lora_share"] if decode else None,
            "base_share": decode["base_share"] if decode else None,
            "decode_profile": decode}


def _pct(x) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


def table(rows: list[dict]) -> str:
    head = ("| model | TP | GPUs | setting | out tok/s | vs base | LoRA comm / step "
            "| base all-reduce / step |\n|---|---:|---|---|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        base = r["output_tokens_per_s"].get(SETTINGS[0])
        gpus = ", ".join(sorted(set(r["gpus"]))) or "–"
        for s in SETTINGS:
            v = r["output_tokens_per_s"].get(s)
            rel = None if v is None or not base else v / base
            comm = (_pct(r["lora_share"]), _pct(r["base_share"])) if s == "S1 1000 adapters" \
                else ("", "")
            lines.append(f"| {r['model']} | {r['tensor_parallel_size']} | {gpus} | {s} | "
                         f"{'–' if v is None else f'{v:.0f}'} | {_pct(rel)} | {comm[0]} | "
                         f"{comm[1]} |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(check, ours, verdict) of the issue's targets; 'not run' where a row is missing."""
    by = {(r["model"], r["tensor_parallel_size"]): r for r in rows}
    out = []
    widest = max((r["tensor_parallel_size"] for r in rows), default=0)
    for model in sorted({r["model"] for r in rows}):
        r = by.get((model, 4)) or (by.get((model, widest)) if widest > 1 else None)
        n = r["tensor_parallel_size"] if r else 4
        t = r["output_tokens_per_s"] if r else {}
        s1 = t.get("S1 1000 adapters"), t.get(SETTINGS[0])
        rel = s1[0] / s1[1] if r and None not in s1 and s1[1] else None
        out.append((f"{model} TP={n}: S1 1000 adapters vs base >= {S1_TARGET:.0%}", _pct(rel),
                    _verdict(rel, rel is not None and rel >= S1_TARGET)))
        share = r["lora_share"] if r else None
        out.append((f"{model} TP={n}: LoRA comm <= {LORA_COMM_TARGET:.0%} of a decode step",
                    _pct(share), _verdict(share, share is not None and
                                          share <= LORA_COMM_TARGET)))
        two, four = by.get((model, 2)), by.get((model, 4))
        if model == MODELS["30b"] or (two and four):
            g = [x["output_tokens_per_s"].get("S1 1000 adapters") if x else None
                 for x in (two, four)]
            ratio = g[1] / g[0] if None not in g and g[0] else None
            out.append((f"{model} TP 2 -> 4: S1 1000 adapters throughput >= "
                        f"{SCALING_TARGET:.0f}x", "–" if ratio is None else f"{ratio:.2f}x",
                        _verdict(ratio, ratio is not None and ratio >= SCALING_TARGET)))
    return out


def _verdict(value, ok: bool) -> str:
    return "not run" if value is None else "met" if ok else "MISSED"


def report(rows: list[dict], command: str, dry: bool) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    note = (" Dry run: dummy-tiny on the CPU with a tiny workload; the figures test the "
            "format only." if dry else "")
    parts = [f"Tensor-parallel suite, {date}.{note}\n\n`{command}`", table(rows),
             "| check | ours | |\n|---|---:|---|\n" + "\n".join(
                 f"| {c} | {o} | {v} |" for c, o, v in checks(rows))]
    errors = [f"* {r['model']} TP={r['tensor_parallel_size']}: {e}" for r in rows
              for e in r["errors"]]
    if errors:
        parts.insert(1, "\n".join(errors))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = plan_rows(args)
    if not rows:
        print("tp_suite: no row matches --models and --sizes", file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch

        refusal = refuse_missing_gpus(rows, torch.cuda.device_count())
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
    extra = args.serving_args.split()
    results = []
    for row in rows:
        parts = {name: run_serving(flags + extra, os.path.join(
            args.out, f"{row.model}-tp{row.size}", name))
            for name, flags in runs_of(row, args.dry_run)}
        results.append(collect(row, parts))
    command = " ".join(["python -m slora.bench.tp_suite"] + (argv if argv is not None
                                                               else sys.argv[1:]))
    text = report(results, command, args.dry_run)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tp_suite.json"), "w") as f:
        json.dump({"command": command, "dry_run": args.dry_run, "rows": results}, f, indent=1)
    with open(os.path.join(args.out, "tp_suite.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
