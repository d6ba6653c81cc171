"""The ground truth for tests: a plain per-group torch.mm loop in float64, written independently
of the library (it shares no code with gmm_plugin)."""
from __future__ import annotations

import torch


def counts_of(group_list, cumsum: bool) -> list[int]:
    values = group_list.tolist() if isinstance(group_list, torch.Tensor) else list(group_list)
    if not cumsum:
        return values
    return [b - a for a, b in zip([0] + values[:-1], values)]


def gmm_reference(x, weight, counts, group_type=0, bias=None):
    """float64 result of the grouped matmul (same semantics as npu_gmm); differentiable."""
    x, weight = x.double(), weight.double()
    b = None if bias is None else bias.double()
    if group_type == -1:
        y = x @ weight
        return y if b is None else y + b.reshape(-1)
    out, start = [], 0
    for e, c in enumerate(counts):
        if group_type == 0:
            part = x[start:start + c] @ weight[e]
            if b is not None:
                part = part + b[e]
        else:  # group_type 2: y[e] = x[:, seg] @ weight[seg]
            part = x[:, start:start + c] @ weight[start:start + c]
            if b is not None:
                part = part + b[e]
        out.append(part)
        start += c
    return torch.cat(out, 0) if group_type == 0 else torch.stack(out)


EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


def tolerance(dtype: torch.dtype, k: int, scale: float) -> float:
    """Max abs error allowed against float64 for a result of magnitude `scale` reduced over k terms.

    Inputs are exactly representable (the reference uses the same rounded values), so the error is
    the output rounding (half an ulp, twice when a bias is added after the GEMM: 2 * eps covers it)
    plus fp32 accumulation error (~ sqrt(k) * 2^-24 relative, with a 4x margin).
    """
    return (2 * EPS[dtype] + 4 * max(k, 1) ** 0.5 * 2.0 ** -24) * max(scale, 1e-6)
