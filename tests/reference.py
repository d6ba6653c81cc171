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
    """float64 result of the grouped matmul (same semantics as npu_gmm)."""
    x, weight = x.detach().double(), weight.detach().double()
    b = None if bias is None else bias.detach().double()
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


def tolerance(dtype: torch.dtype, k: int) -> float:
    """Max abs error allowed against float64 for unit-scale inputs with reduction length k.

    One rounding of the output (eps/2 relative) dominates for 16-bit types; fp32 accumulation
    error grows ~ sqrt(k) * eps. Values are O(sqrt(k)) for randn inputs, hence the sqrt(k) factor.
    """
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23,
           torch.float64: 2.0 ** -52}[dtype]
    return 4 * eps * max(k, 1) ** 0.5 + 1e-12
