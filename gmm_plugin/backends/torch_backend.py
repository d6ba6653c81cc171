"""torch._grouped_mm on CPU and CUDA, with a per-group loop where the native op does not apply.

torch._grouped_mm wants int32 cumulative end offsets, 16-byte aligned strides and one of the two
last dims contiguous; it has no bias and cannot accumulate into an existing tensor. Offsets come
from `Groups.safe_offsets`, so a bad device group_list never sends it out of bounds.
"""
from __future__ import annotations

import torch

from ..group_list import Groups

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


class TorchBackend:
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def grouped_mm(self, x, w, groups: Groups):
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[-1])
        if _native_ok(x, w):
            return torch._grouped_mm(x, w, groups.safe_offsets())
        y = x.new_empty(x.shape[0], w.shape[-1])
        for e, s, t in _host_segments(groups):
            torch.mm(x[s:t], w[e], out=y[s:t])
        return y

    def grouped_mm_k(self, a, b, groups: Groups, out=None):
        if out is None:
            if a.shape[1] > 0 and _native_ok(a, b):
                return torch._grouped_mm(a, b, groups.safe_offsets())
            out = a.new_zeros(groups.num_groups, a.shape[0], b.shape[1])
        # Accumulate group by group: the only transient is one group's operands in out's dtype.
        for e, s, t in _host_segments(groups):
            if t > s:
                out[e].addmm_(a[:, s:t].to(out.dtype), b[s:t].to(out.dtype))
        return out
