"""torch._grouped_mm on CPU and CUDA where it has a kernel, a loop of GEMMs over host group sizes
elsewhere.

On CUDA, torch._grouped_mm has a native kernel only for bf16 on SM90/SM100; everything else goes
to a fallback that copies the offsets to the host (`offs.cpu()`, a sync), so those cases loop
over `Groups.segments()` here instead: host sizes the caller already had, no sync. On a CPU
the op's fallback is the same loop and costs nothing extra. torch._grouped_mm wants int32
cumulative end offsets (`Groups.safe_offsets`, so a bad device group_list never sends it out of
bounds), 16-byte aligned strides and one of the two last dims contiguous; it has no bias and
cannot accumulate into an existing tensor. Its split-K form (a weight gradient) is not trusted
with empty groups on CUDA: SM100 leaves non-zero values there (pytorch issue #172439), ROCm
uninitialised memory (pytorch PR #174314); `_zero_empty_groups` zeroes them on the device.

CUDA paths, none of which has run on a GPU here (no GPU in this project's sessions): see
`_accumulate` for the fp32 fused form, `accumulate_k` for the one temporary.
"""
from __future__ import annotations

import functools

import torch

from ..group_list import Groups
from .. import torch_caps
from . import cpu_workers

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 16  # bytes; torch._grouped_mm rejects other strides ("strides should be multiple of 16 bytes")
_CUDA_NATIVE_ARCHS = (9, 10)  # SM90 / SM100: the CUTLASS kernel (bf16 only); elsewhere a syncing fallback
_BLOCK_ROWS = 256  # summed rows converted to fp32 at a time when out is wider than a, b
# Devices whose torch._grouped_mm split-K output is taken as it is for empty groups (elsewhere
# they are zeroed), and devices where the fused backward uses one grouped GEMM + add (no host sync).
_SPLIT_K_TRUSTED = ("cpu",)
_GROUPED_ACCUMULATE = ("cuda",)


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm takes these operands, and runs them without a host sync."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = tensors[0].device
    if device.type == "cuda":
        if any(t.dtype != torch.bfloat16 for t in tensors) or \
                torch.cuda.get_device_capability(device)[0] not in _CUDA_NATIVE_ARCHS:
            return False
    elif device.type != "cpu":
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
    # The op can exist with no CPU kernel (torch 2.8), or without one for a dtype: ask it.
    return device.type != "cpu" or all(torch_caps.cpu_grouped_mm(t.dtype) for t in tensors)


def _zero_empty_groups(r: torch.Tensor, groups: Groups) -> torch.Tensor:
    """r [E, P, N] (a split-K product) with the groups that have no rows set to zero, in place, on
    r's device from the device counts: no host sync. A fill, not a multiply by (count > 0): the
    values left there may be NaN, and 0 * NaN is NaN."""
    return r.masked_fill_((groups.counts() == 0).view(-1, 1, 1), 0)


@functools.lru_cache(maxsize=None)
def _mixed_addmm_ok(device: torch.device, operand: torch.dtype, out: torch.dtype) -> bool:
    """torch.addmm(out, a, b, out_dtype=out.dtype, out=out), a and b narrower than out, runs here.

    Asked of torch once per device and dtypes (an exception is the answer; no value is read back,
    so no host sync): the `out_dtype` argument exists from torch 2.8, and until pytorch PR #167931
    CUDA's kernel requires `self` in mat2's dtype, which an fp32 main_grad with bf16 operands is
    not; CPUs have no such kernel (NotImplementedError on 2.13)."""
    try:
        acc = torch.zeros(1, 1, dtype=out, device=device)
        one = torch.ones(1, 1, dtype=operand, device=device)
        torch.addmm(acc, one, one, out_dtype=out, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _accumulate(out, a, b, s, t, wgrad_dtype):
    """out += a[:, s:t] @ b[s:t], out wider than a and b (fp32 main_grad) or the same dtype.

    fp32 products convert the operands _BLOCK_ROWS summed rows at a time, so that transient stays
    ~ _BLOCK_ROWS * (P + N) elements however large the group is (a whole group could exceed the
    gradient it is accumulating; measured no slower). "input" products come from one GEMM in a's
    dtype per call: its temporary has out's shape in a's dtype, at most half of out's bytes, as
    Megatron's own expert gradient before DDP adds it into main_grad (one GEMM measured 8-15 %
    faster than 256-row blocks at the bench's E=8 layer shapes)."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        out.addmm_(a[:, s:t], b[s:t])
    elif wgrad_dtype == "input":  # one rounding to a's dtype, then the fp32 add
        out.add_(torch.mm(a[:, s:t], b[s:t]))
    elif out.device.type != "cpu" and _mixed_addmm_ok(out.device, a.dtype, out.dtype):
        # cuBLAS: 16-bit operands, fp32 sums, accumulated into out in place (beta = 1), no temporary.
        torch.addmm(out, a[:, s:t], b[s:t], out_dtype=out.dtype, out=out)
    else:  # every torch, every device: blocks of the summed rows, converted: fp32 products and sums
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
    out = [(e, lo, hi) for e, s, t in groups.segments() for lo, hi in cpu_workers.blocks(s, t, step)]
    return sorted(out, key=lambda p: p[1] - p[2])


def _split_k_pieces(groups: Groups, rows: int, workers: int):
    """(group, first column of a, end column, first output row, end output row) pieces, largest
    first: whole groups when there are enough to share out, else output-row blocks of each."""
    segments = [(e, s, t) for e, s, t in groups.segments() if t > s]
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
        if not n and w.dtype == x.dtype and _grouped_mm_ok(x, w):
            return torch._grouped_mm(x, w, groups.safe_offsets())
        y = x.new_empty(x.shape[0], w.shape[-1])  # only here: _grouped_mm allocates its own
        if n:  # CPU: the cores share out pieces of the groups' rows

            def do(piece):
                e, s, t = piece
                torch.mm(x[s:t], w[e].to(x.dtype), out=y[s:t])
            cpu_workers.run(_split_m_pieces(groups, x.shape[0], n), do, n)
            return y
        for e, s, t in groups.segments():
            torch.mm(x[s:t], w[e].to(x.dtype), out=y[s:t])
        return y

    def grouped_mm_k(self, a, b, groups: Groups):
        n = self._workers_k(a, b, groups)
        if not n and a.shape[1] > 0 and _grouped_mm_ok(a, b):
            r = torch._grouped_mm(a, b, groups.safe_offsets())
            return r if r.device.type in _SPLIT_K_TRUSTED else _zero_empty_groups(r, groups)
        out = a.new_empty(groups.num_groups, a.shape[0], b.shape[1])
        for e, s, t in groups.segments():
            if s == t:
                out[e].zero_()
        if n:  # CPU: the cores share out groups (or blocks of their output rows)

            def do(piece):
                e, s, t, lo, hi = piece
                torch.mm(a[lo:hi, s:t], b[s:t], out=out[e, lo:hi])
            cpu_workers.run(_split_k_pieces(groups, a.shape[0], n), do, n)
            return out
        for e, s, t in groups.segments():
            if t > s:
                torch.mm(a[:, s:t], b[s:t], out=out[e])
        return out

    def accumulate_k(self, out, a, b, groups: Groups, *, wgrad_dtype: str):
        n = self._workers_k(a, b, groups, out)
        if n:

            def do(piece):
                e, s, t, lo, hi = piece
                _accumulate(out[e, lo:hi], a[lo:hi], b, s, t, wgrad_dtype)
            cpu_workers.run(_split_k_pieces(groups, a.shape[0], n), do, n)
            return
        if out.device.type in _GROUPED_ACCUMULATE and (wgrad_dtype == "input" or a.dtype == out.dtype) \
                and _grouped_mm_ok(a, b):
            # One grouped GEMM in a's dtype into a temporary [E, P, N] (half of an fp32 out for
            # bf16 a: the one gradient-sized allocation of a fused backward, README), its empty
            # groups zeroed, then one add: no host sync, where the loop below needs host sizes.
            r = torch._grouped_mm(a, b, groups.safe_offsets())
            out.add_(r if r.device.type in _SPLIT_K_TRUSTED else _zero_empty_groups(r, groups))
            return
        for e, s, t in groups.segments():
            if t > s:
                _accumulate(out[e], a, b, s, t, wgrad_dtype)

    @staticmethod
    def _workers_k(a, b, groups, *extra):
        return cpu_workers.usable_workers(2.0 * a.shape[0] * a.shape[1] * b.shape[1],
                                          _mean_group(groups, a.shape[1]), a.shape[0] * b.shape[1],
                                          a, b, *extra)
