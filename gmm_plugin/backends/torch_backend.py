"""torch._grouped_mm on CPU and CUDA, with a per-group loop where the native op does not apply.

torch._grouped_mm wants int32 cumulative end offsets, 16-byte aligned strides and one of the two
last dims contiguous; it has no bias and cannot accumulate into an existing tensor. Offsets come
from `Groups.safe_offsets`, so a bad device group_list never sends it out of bounds.
"""
from __future__ import annotations

import torch

from ..group_list import Groups
from . import cpu_workers

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 16  # bytes; torch._grouped_mm rejects other strides ("strides should be multiple of 16 bytes")


def _native_ok(*tensors: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in _NATIVE_DTYPES:
            return False
        size = t.element_size()
        if t.data_ptr() % _ALIGN:
            return False
        unit = t.dim() - 1 if t.stride(-1) == 1 else t.dim() - 2
        if t.stride(unit) != 1:
            return False
        if any((s * size) % _ALIGN for d, s in enumerate(t.stride()) if d != unit):
            return False
    return True


def _host_segments(groups: Groups):
    offsets = groups.host_offsets()
    if offsets is None:  # device group_list on a layout the native op rejects: one host read
        offsets = tuple(groups.safe_offsets(torch.int64).tolist())
    start = 0
    for e, end in enumerate(offsets):
        yield e, start, end
        start = end


def _rows_job(x, w, y, segments, lo, hi):
    """y[r] = x[r] @ w[group of r] for the rows r in [lo, hi)."""
    def job():
        for e, s, t in segments:
            s, t = max(s, lo), min(t, hi)
            if s < t:
                torch.mm(x[s:t], w[e], out=y[s:t])
    return job


def _k_job(a, b, out, segments, lo, hi, accumulate):
    """Rows [lo, hi) of out[e] = a[:, seg e] @ b[seg e] (added in out's dtype when accumulating)."""
    def job():
        for e, s, t in segments:
            if s < t:
                if accumulate:
                    out[e, lo:hi].addmm_(a[lo:hi, s:t].to(out.dtype), b[s:t].to(out.dtype))
                else:
                    torch.mm(a[lo:hi, s:t], b[s:t], out=out[e, lo:hi])
    return job


class TorchBackend:
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def grouped_mm(self, x, w, groups: Groups):
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[-1])
        n = cpu_workers.usable_workers(2.0 * x.shape[0] * x.shape[1] * w.shape[-1], x, w)
        if n:  # CPU: each core takes a contiguous share of the rows
            y = x.new_empty(x.shape[0], w.shape[-1])
            segments = list(_host_segments(groups))
            cpu_workers.run(_rows_job(x, w, y, segments, lo, hi) for lo, hi in cpu_workers.spans(x.shape[0], n))
            return y
        if _native_ok(x, w):
            return torch._grouped_mm(x, w, groups.safe_offsets())
        y = x.new_empty(x.shape[0], w.shape[-1])
        for e, s, t in _host_segments(groups):
            torch.mm(x[s:t], w[e], out=y[s:t])
        return y

    def grouped_mm_k(self, a, b, groups: Groups, out=None):
        flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        n = cpu_workers.usable_workers(flops, a, b, *(() if out is None else (out,)))
        if n:  # CPU: each core takes a contiguous share of every group's output rows
            segments = list(_host_segments(groups))
            accumulate = out is not None
            if out is None:
                out = a.new_empty(groups.num_groups, a.shape[0], b.shape[1])
                for e, s, t in segments:
                    if s == t:
                        out[e].zero_()
            cpu_workers.run(_k_job(a, b, out, segments, lo, hi, accumulate)
                            for lo, hi in cpu_workers.spans(a.shape[0], n))
            return out
        if out is None:
            if a.shape[1] > 0 and _native_ok(a, b):
                return torch._grouped_mm(a, b, groups.safe_offsets())
            out = a.new_zeros(groups.num_groups, a.shape[0], b.shape[1])
        # Accumulate group by group: the only transient is one group's operands in out's dtype.
        for e, s, t in _host_segments(groups):
            if t > s:
                out[e].addmm_(a[:, s:t].to(out.dtype), b[s:t].to(out.dtype))
        return out
