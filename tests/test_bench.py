"""Smoke tests of `gmm-plugin bench` on tiny shapes: it runs, prints the table, writes JSON and a
chart, and evaluates every target. No timing is asserted (figures on tiny shapes mean nothing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gmm_plugin import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_sizes_uneven_with_empty_experts_and_exact_sum():
    for experts in (4, 8, 64):
        sizes = bench.moe_group_sizes(8192, experts)
        assert sum(sizes) == 8192 and len(sizes) == experts
        assert 0 in sizes and len(set(sizes)) > 2
        assert sizes == bench.moe_group_sizes(8192, experts)  # deterministic


def test_gmm_suite_in_process(tmp_path, capsys):
    out = tmp_path / "b.json"
    png = tmp_path / "b.png"
    assert bench.main(["--tiny", "--suite", "gmm", "--json", str(out), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "gmm-plugin" in text and "torch._grouped_mm" in text and "# targets" in text
    data = json.loads(out.read_text())
    rows = data["rows"]
    ops = {(r["op"], r["dtype"]) for r in rows}
    for dt in ("fp32", "bf16"):
        assert {("forward", dt), ("forward+backward", dt), ("fused backward", dt)} <= ops
    assert ("forward", "fp16") in ops
    for r in rows:
        assert r["time_ms"] > 0 and r["peak_mb"] is not None or r["dtype"] == "fp16"
    fp16 = [r for r in rows if r["dtype"] == "fp16" and r["impl"] == "gmm-plugin"][0]
    assert fp16["extra"]["max_abs_err"] <= fp16["extra"]["tolerance"]  # correctness, not speed
    names = [t["name"] for t in data["targets"]]
    assert any("fused backward" in n for n in names) and any("fp16" in n for n in names)
    # fused_wgrad_dtype "input" has its own rows and targets where it changes the GEMM (bf16 on
    # a CPU), and the bench leaves the process-wide setting at its default
    fused = {(r["dtype"], r["impl"]) for r in rows if r["op"] == "fused backward"}
    assert ("bf16", bench.FUSED_INPUT) in fused and ("fp32", bench.FUSED_INPUT) not in fused
    assert any("bf16" in n and "fused_wgrad_dtype input" in n for n in names)
    from gmm_plugin import settings
    assert settings.current().fused_wgrad_dtype == "auto"
    assert data["machine"]["cpu_count"] >= 1
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 0
    except ImportError:
        pass


def test_bad_arguments_exit_2(capsys):
    assert bench.main(["--dtypes", "fp8"]) == 2
    assert "unknown dtype or suite" in capsys.readouterr().err


def test_peak_bytes_counts_a_temporary():
    def make():
        t = torch.ones(16, 1024, 1024)  # 64 MiB, written so its pages are resident
        del t
    peak = bench.peak_bytes(make, torch.device("cpu"))
    assert peak is not None and peak >= 60 * 2 ** 20


@pytest.mark.megatron
def test_command_with_layer_suite(tmp_path):
    pytest.importorskip("megatron.core")
    out = tmp_path / "l.json"
    proc = subprocess.run([sys.executable, "-m", "gmm_plugin.bench", "--tiny", "--suite", "gmm,layer",
                           "--dtypes", "bf16", "--no-memory", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    impls = {r["impl"] for r in rows if r["suite"] == "layer"}
    assert {"SequentialMLP", "gmm-plugin", "expert GEMMs as dense torch.mm", bench.FUSED_INPUT_LAYER} <= impls
    assert "MoE layer" in proc.stdout
