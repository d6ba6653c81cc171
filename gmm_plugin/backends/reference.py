"""The ground truth: a plain per-group loop of torch.mm. Slow for many groups, obviously right."""
from __future__ import annotations

import torch

from ..group_list import Groups


def _segments(groups: Groups):
    """(group, start, end) for every group; needs the sizes on the host."""
    offsets = groups.host_offsets()
    if offsets is None:  # device group_list: one host copy, acceptable for the reference only
        offsets = tuple(groups.safe_offsets(torch.int64).tolist())
    start = 0
    for e, end in enumerate(offsets):
        yield e, start, end
        start = end


class ReferenceBackend:
    name = "reference"

    def supports(self, device: torch.device) -> bool:
        return True

    def grouped_mm(self, x, w, groups: Groups):
        y = x.new_zeros(x.shape[0], w.shape[-1])
        for e, s, t in _segments(groups):
            if t > s:
                y[s:t] = torch.mm(x[s:t], w[e])
        return y

    def grouped_mm_k(self, a, b, groups: Groups, out=None):
        result = a.new_zeros(groups.num_groups, a.shape[0], b.shape[1]) if out is None else out
        for e, s, t in _segments(groups):
            if t > s:
                prod = torch.mm(a[:, s:t].to(result.dtype), b[s:t].to(result.dtype))
                result[e].add_(prod)
        return result
