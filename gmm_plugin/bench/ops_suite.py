"""The GMM suite: forward, forward+backward and fused backward of npu_gmm_v2 for MoE shapes,
against one dense torch.mm of the same FLOPs, a per-group loop and torch._grouped_mm.

The fused rows accumulate into an fp32 main_grad of a parameter that carries Megatron DDP's
`grad_added_to_main_grad` flag (reset before every call, as DDP's zero_grad_buffer does), so they
include whatever the op hands autograd for DDP's hook (the dummy weight gradient).
"""
from __future__ import annotations

import sys

import torch

from .. import settings, torch_caps
from ..ops.gmm import npu_gmm_v2
from .cases import DTYPES, GmmProblem, loop_forward, wgrad_dtype_matters
from .fp16_cpu import fp16_cpu_rows
from .measure import Row, measure, rows_from

DENSE = "dense torch.mm"
DENSE3 = "dense torch.mm x3"
UNFUSED = "gmm-plugin unfused + main_grad.add_"
FUSED = "gmm-plugin gemm_fusion"
FUSED_AS = {dt: f"gmm-plugin gemm_fusion, fused_wgrad_dtype {dt}" for dt in ("fp32", "input")}


def suite_name(device: torch.device) -> str:
    return "gmm" if device.type == "cpu" else f"gmm-{device.type}"


def gmm_suite(args, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for E in args.experts:
            p = GmmProblem(args.tokens, args.hidden, args.ffn, E, dtype, device, args.layout, args.seed)
            if dtype == torch.float16 and device.type == "cpu":
                if not torch_caps.cpu_mm(dtype):  # torch 2.1: no fp16 GEMM on a CPU to compare with
                    print(f"gmm suite: no fp16 rows: torch {torch.__version__} has no CPU fp16 torch.mm",
                          file=sys.stderr, flush=True)
                    continue
                new = fp16_cpu_rows(p, args, suite_name(device))
            else:
                new = _forward_rows(p, dname, args) + _backward_rows(p, dname, args) + _fused_rows(p, dname, args)
            rows += new
            if args.verbose:
                for r in new:
                    print("  ..", r.op, r.dtype, r.experts, r.impl, r.time_ms, file=sys.stderr, flush=True)
    return rows


def _meta(p: GmmProblem, op: str, dname: str) -> dict:
    return dict(suite=suite_name(p.device), op=op, dtype=dname, experts=p.E)


def _forward_rows(p: GmmProblem, dname: str, args) -> list[Row]:
    cases = {
        DENSE: lambda: torch.mm(p.x, p.w_dense),
        "gmm-plugin": lambda: npu_gmm_v2(p.x, p.w, group_list=p.counts),
        "per-group loop": lambda: loop_forward(p.x, p.w, p.sizes),
    }
    if torch_caps.grouped_mm(p.device, p.x.dtype):
        cases["torch._grouped_mm"] = lambda: torch._grouped_mm(p.x, p.w, p.offs)
    with torch.no_grad():
        samples, peaks = measure(cases, args, p.device)
    return rows_from(samples, p.flops(), DENSE, _meta(p, "forward", dname), peaks)


def _dense3(p: GmmProblem):
    def run():
        torch.mm(p.x, p.w_dense)
        torch.mm(p.dy, p.w_dense.t())
        torch.mm(p.x.t(), p.dy)
    return run


def _leaves(p: GmmProblem):
    return p.x.detach().requires_grad_(True), p.param.detach().requires_grad_(True)


def _backward_rows(p: GmmProblem, dname: str, args) -> list[Row]:
    """Forward and backward (3 GEMMs); the gradients are dropped after each call."""
    xl, wl = _leaves(p)
    wv = p.weight_view(wl)

    def autograd(f):
        def run():
            f(xl, wv).backward(p.dy)
            xl.grad = wl.grad = None
        return run

    cases = {
        DENSE3: _dense3(p),
        "gmm-plugin": autograd(lambda a, b: npu_gmm_v2(a, b, group_list=p.counts)),
        "per-group loop": autograd(lambda a, b: loop_forward(a, b, p.sizes)),
    }
    if torch_caps.grouped_mm(p.device, p.x.dtype):
        cases["torch._grouped_mm"] = autograd(lambda a, b: torch._grouped_mm(a, b, p.offs))
    samples, peaks = measure(cases, args, p.device)
    return rows_from(samples, 3 * p.flops(), DENSE3, _meta(p, "forward+backward", dname), peaks)


def _fused_rows(p: GmmProblem, dname: str, args) -> list[Row]:
    """The weight gradient into an fp32 main_grad: unfused then added (DDP's hook), or fused."""
    xl, wl = _leaves(p)
    wv = p.weight_view(wl)
    wl.main_grad = torch.zeros(wl.shape, dtype=torch.float32, device=p.device)

    def unfused():
        npu_gmm_v2(xl, wv, group_list=p.counts).backward(p.dy)
        wl.main_grad.add_(wl.grad)  # what Megatron's DDP hook does with an ordinary gradient
        xl.grad = wl.grad = None

    def fused(**changes):
        def run():
            wl.grad_added_to_main_grad = False  # DDP's zero_grad_buffer
            with settings(**changes):
                npu_gmm_v2(xl, wv, group_list=p.counts, gemm_fusion=True, original_weight=wl).backward(p.dy)
            xl.grad = wl.grad = None  # DDP's hook drops whatever autograd was handed
        return run

    cases = {DENSE3: _dense3(p), UNFUSED: unfused, FUSED: fused()}
    if wgrad_dtype_matters(p.dtype, p.device):
        cases.update({name: fused(fused_wgrad_dtype=dt) for dt, name in FUSED_AS.items()})
    samples, peaks = measure(cases, args, p.device)
    wgrad_mb = p.wgrad_mb()
    return rows_from(samples, 3 * p.flops(), DENSE3, _meta(p, "fused backward", dname), peaks,
                     notes={FUSED: f"weight grad {wgrad_mb:.1f} MB"}, extra={"wgrad_mb": wgrad_mb})
