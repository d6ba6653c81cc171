"""CUDA checks (only where CUDA exists): the GMM path free of host syncs, and the plugin's
overhead over a direct torch._grouped_mm (bf16)."""
from __future__ import annotations

import torch

from ..ops.gmm import npu_gmm_v2
from .cases import GmmProblem
from .measure import Row, rows_from, time_cases

NO_SYNC = "no host sync"


def cuda_suite(args) -> list[Row]:
    device = torch.device("cuda")
    rows = []
    for E in args.experts:
        p = GmmProblem(args.tokens, args.hidden, args.ffn, E, torch.bfloat16, device, args.layout, args.seed)
        for what, fn in _sync_cases(p).items():
            fn()  # warm caches (and the fused dummy) before the check
            rows.append(Row(suite="cuda", op="sync check", dtype="bf16", experts=E, impl=what, time_ms=None,
                            note=_host_sync(fn)))
        with torch.no_grad():
            cases = {"torch._grouped_mm": lambda: torch._grouped_mm(p.x, p.w, p.offs),
                     "gmm-plugin": lambda: npu_gmm_v2(p.x, p.w, group_list=p.counts)}
            samples = time_cases(cases, max(args.repeat, 20), max(args.warmup, 3), device)
        meta = dict(suite="cuda", op="forward overhead", dtype="bf16", experts=E)
        rows += rows_from(samples, p.flops(), "torch._grouped_mm", meta, {})
    return rows


def _sync_cases(p: GmmProblem) -> dict:
    """fwd+bwd with group_list on the device and on the host (the dispatcher's counts), and the
    fused backward into a DDP-owned fp32 main_grad."""
    xl = p.x.detach().requires_grad_(True)
    wl = p.param.detach().requires_grad_(True)
    wv = p.weight_view(wl)

    def step(counts, **fusion):
        def run():
            if fusion:
                wl.grad_added_to_main_grad = False
            npu_gmm_v2(xl, wv, group_list=counts, **fusion).backward(p.dy)
            xl.grad = wl.grad = None
        return run

    wl.main_grad = torch.zeros(wl.shape, dtype=torch.float32, device=p.device)
    return {"fwd+bwd, group_list on device": step(p.counts),
            "fwd+bwd, group_list on host": step(p.host_counts),
            "gemm_fusion fwd+bwd, group_list on host": step(p.host_counts, gemm_fusion=True, original_weight=wl)}


def _host_sync(fn) -> str:
    """NO_SYNC, or the first line of the error torch raises at the first synchronising call."""
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    except RuntimeError as e:
        return f"HOST SYNC: {str(e).splitlines()[0][:120]}"
    return NO_SYNC
