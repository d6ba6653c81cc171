"""fp16 on a CPU: the plugin (fp32 compute, one rounding) against a dense fp16 torch.mm.

A CPU has no fast fp16 GEMM (~1 GFLOP/s), so the dense product is timed on a few rows and
scaled to the full size (GEMM time is linear in M there); the plugin's result is checked
against float64 on the way.
"""
from __future__ import annotations

import torch

from ..ops.gmm import npu_gmm_v2
from .cases import EPS, GmmProblem
from .measure import Row, measure, rows_from, time_cases

DENSE = "dense torch.mm"


def fp16_cpu_rows(p: GmmProblem, args, suite: str) -> list[Row]:
    r = max(1, min(args.fp16_dense_rows, p.M))
    xr = p.x[:r]
    dense = time_cases({DENSE: lambda: torch.mm(xr, p.w_dense)}, max(1, min(args.repeat, 2)), 0, p.device)
    scale = p.M / r
    samples = {DENSE: [t * scale for t in dense[DENSE]]}
    with torch.no_grad():
        plugin, peaks = measure({"gmm-plugin": lambda: npu_gmm_v2(p.x, p.w, group_list=p.counts)}, args, p.device)
        err, tol = fp16_error(p, npu_gmm_v2(p.x, p.w, group_list=p.counts))
    samples.update(plugin)
    speedup = min(samples[DENSE]) / min(samples["gmm-plugin"])
    notes = {DENSE: f"timed on {r} of {p.M} rows, scaled by {scale:g} (scalar fp16 kernel, ~1 GFLOP/s)",
             "gmm-plugin": f"{speedup:.0f}x faster; max abs err {err:.3g} (fp16 tolerance {tol:.3g})"}
    rows = rows_from(samples, p.flops(), DENSE, dict(suite=suite, op="forward", dtype="fp16", experts=p.E),
                     peaks, notes=notes)
    rows[-1].extra.update(max_abs_err=err, tolerance=tol)
    return rows


def fp16_error(p: GmmProblem, y: torch.Tensor) -> tuple[float, float]:
    """Max abs error of the fp16 result against float64, and the bound: one fp16 rounding
    (2 ulps at the largest output), which fp32 accumulation plus a single final rounding meets."""
    x64, w64 = p.x.double(), p.w.double()
    err = big = 0.0
    start = 0
    for e, c in enumerate(p.sizes):
        if c:
            ref = x64[start:start + c] @ w64[e]
            err = max(err, (y[start:start + c].double() - ref).abs().max().item())
            big = max(big, ref.abs().max().item())
        start += c
    return err, 2 * EPS[torch.float16] * big
