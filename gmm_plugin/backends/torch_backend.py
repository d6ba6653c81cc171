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


FUSED_WGRAD_DTYPES = ("fp32", "input")
_fused_wgrad_dtype = "fp32"


def set_fused_wgrad_dtype(dtype: str) -> None:
    """How gemm_fusion computes a bf16/fp16 weight gradient before adding it into the fp32 main_grad.

    'fp32' (default): fp32 products and fp32 sums, as Ascend's GroupedMatmulAdd and Megatron's
    fused wgrad kernels do. A CPU has no bf16 x bf16 -> fp32 GEMM, so this runs at the fp32 rate.
    'input': a GEMM in the operands' dtype (it sums in fp32 inside, then rounds each group's
    gradient once), then the add: the accuracy of Megatron's unfused path, at the 16-bit rate.
    """
    global _fused_wgrad_dtype
    if dtype not in FUSED_WGRAD_DTYPES:
        raise ValueError(f"fused_wgrad_dtype must be one of {', '.join(FUSED_WGRAD_DTYPES)}, got {dtype!r}.")
    _fused_wgrad_dtype = dtype


_BLOCK_ROWS = 256  # rows converted (fp32) or produced (input) at a time when out is wider than a, b


def _accumulate(out, a, b, s, t):
    """out += a[:, s:t] @ b[s:t], out wider than a and b (fp32 main_grad) or the same dtype.

    Work that needs a temporary goes _BLOCK_ROWS rows at a time, so the transient stays ~
    _BLOCK_ROWS * (P + N) elements (fp32) or _BLOCK_ROWS * N (input) however large the group is
    (a whole group could exceed the gradient it is accumulating); measured no slower."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        out.addmm_(a[:, s:t], b[s:t])
    elif _fused_wgrad_dtype == "input":  # blocks of out's rows, one rounding to a's dtype each
        for lo in range(0, out.shape[0], _BLOCK_ROWS):
            hi = min(lo + _BLOCK_ROWS, out.shape[0])
            out[lo:hi].add_(torch.mm(a[lo:hi, s:t], b[s:t]))
    else:  # blocks of the summed rows, converted: fp32 products and sums
        for lo in range(s, t, _BLOCK_ROWS):
            hi = min(lo + _BLOCK_ROWS, t)
            out.addmm_(a[:, lo:hi].to(out.dtype), b[lo:hi].to(out.dtype))


def _mean_group(groups: Groups, total: int) -> float:
    """Mean size of the non-empty groups (host sizes; inf when they live on a device)."""
    counts = groups.host_counts()
    if counts is None:
        return float("inf")
    busy = sum(1 for c in counts if c > 0)
    return total / busy if busy else 0.0


def _split_m_pieces(groups: Groups, total: int, workers: int):
    """(group, first row, end row) pieces of every group, largest first."""
    step = cpu_workers.block_size(total, workers)
    out = [(e, lo, hi) for e, s, t in _host_segments(groups) for lo, hi in cpu_workers.blocks(s, t, step)]
    return sorted(out, key=lambda p: p[1] - p[2])


def _split_k_pieces(groups: Groups, rows: int, workers: int):
    """(group, first column of a, end column, first output row, end output row) pieces, largest
    first: whole groups when there are enough to share out, else output-row blocks of each."""
    segments = [(e, s, t) for e, s, t in _host_segments(groups) if t > s]
    parts = 1 if len(segments) >= 4 * workers else -(-4 * workers // max(len(segments), 1))
    step = max(-(-rows // parts), 64)
    out = [(e, s, t, lo, hi) for e, s, t in segments for lo, hi in cpu_workers.blocks(0, rows, step)]
    return sorted(out, key=lambda p: (p[1] - p[2]) * (p[4] - p[3]))


class TorchBackend:
    name = "torch"
    converts_weight_per_group = True  # grouped_mm takes w narrower than x (fp16 on a CPU)

    def supports(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def grouped_mm(self, x, w, groups: Groups):
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[-1])
        n = cpu_workers.usable_workers(2.0 * x.shape[0] * x.shape[1] * w.shape[-1],
                                       _mean_group(groups, x.shape[0]), x.shape[1] * w.shape[-1], x, w)
        if n:  # CPU: the cores share out pieces of the groups' rows
            y = x.new_empty(x.shape[0], w.shape[-1])

            def do(piece):
                e, s, t = piece
                torch.mm(x[s:t], w[e].to(x.dtype), out=y[s:t])
            cpu_workers.run(_split_m_pieces(groups, x.shape[0], n), do, n)
            return y
        if w.dtype == x.dtype and _native_ok(x, w):
            return torch._grouped_mm(x, w, groups.safe_offsets())
        y = x.new_empty(x.shape[0], w.shape[-1])
        for e, s, t in _host_segments(groups):
            torch.mm(x[s:t], w[e].to(x.dtype), out=y[s:t])
        return y

    def grouped_mm_k(self, a, b, groups: Groups, out=None):
        n = cpu_workers.usable_workers(2.0 * a.shape[0] * a.shape[1] * b.shape[1], _mean_group(groups, a.shape[1]),
                                       a.shape[0] * b.shape[1], a, b, *(() if out is None else (out,)))
        if n:  # CPU: the cores share out groups (or blocks of their output rows)
            accumulate = out is not None
            if out is None:
                out = a.new_empty(groups.num_groups, a.shape[0], b.shape[1])
                for e, s, t in _host_segments(groups):
                    if s == t:
                        out[e].zero_()

            def do(piece):
                e, s, t, lo, hi = piece
                if accumulate:
                    _accumulate(out[e, lo:hi], a[lo:hi], b, s, t)
                else:
                    torch.mm(a[lo:hi, s:t], b[s:t], out=out[e, lo:hi])
            cpu_workers.run(_split_k_pieces(groups, a.shape[0], n), do, n)
            return out
        if out is None:
            if a.shape[1] > 0 and _native_ok(a, b):
                return torch._grouped_mm(a, b, groups.safe_offsets())
            out = a.new_zeros(groups.num_groups, a.shape[0], b.shape[1])
        for e, s, t in _host_segments(groups):
            if t > s:
                _accumulate(out[e], a, b, s, t)
        return out
