"""The example suite: tokens/s of examples/pretrain_moe.py with and without --use-gmm-plugin."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from .measure import Row


def example_suite(args) -> tuple[list[Row], str | None]:
    """tokens/s of examples/pretrain_moe.py with and without --use-gmm-plugin (source checkout).

    The runs alternate (plain, plugin, plain, plugin, ...); each run's figure is its median step
    time after the first few steps, and the best run of each kind is reported.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "examples", "pretrain_moe.py")
    if not os.path.exists(script):
        return [], f"needs a source checkout with {os.path.relpath(script, root)}"
    config = args.example_config or os.path.join(root, "configs", "pretrain_tiny_cpu.yaml")
    skip = max(1, args.example_steps // 5)
    best: dict[str, list] = {"Megatron experts": [], "gmm-plugin": []}
    tokens = None
    with tempfile.TemporaryDirectory(prefix="gmm_bench_example_") as tmp:
        for r in range(args.example_runs):
            for name, flags in (("Megatron experts", []), ("gmm-plugin", ["--use-gmm-plugin"])):
                out = os.path.join(tmp, f"{r}_{len(flags)}")
                cmd = [sys.executable, script, "--config", config, "--steps", str(args.example_steps),
                       "--out-dir", out, "--save-interval", "0", "--no-plot", "--quiet",
                       "--set", "train.warmup_steps=1", *flags]  # short runs: warmup < steps
                if args.example_threads is not None:
                    cmd += ["--set", f"train.cpu_threads={args.example_threads}"]
                proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
                if proc.returncode != 0:
                    return [], f"the example failed ({' '.join(cmd[1:])}): {proc.stderr.strip()[-400:]}"
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    steps = [json.loads(line) for line in f if line.strip()]
                times = [st["step_time_s"] for st in steps[skip:]] or [st["step_time_s"] for st in steps]
                tokens = steps[0]["tokens_per_s"] * steps[0]["step_time_s"]
                best[name].append(statistics.median(times) * 1e3)
    base = min(best["Megatron experts"])
    rows = []
    for name, runs in best.items():
        t = min(runs)
        threads = "" if args.example_threads is None else f", cpu_threads={args.example_threads}"
        rows.append(Row(suite="example", op=f"pretrain_moe.py step ({os.path.basename(config)}{threads})", dtype="-",
                        experts=0, impl=name, time_ms=round(t, 2), ratio_to_dense=round(t / base, 4),
                        note=f"{tokens / t * 1e3:,.0f} tokens/s", samples_ms=[round(v, 2) for v in runs],
                        extra={"tokens_per_s": tokens / t * 1e3}))
    return rows, None
