"""The ground truth: a plain per-group torch.mm loop. Slow for many groups, obviously right."""
from __future__ import annotations

import torch

from ..group_list import Groups


class ReferenceBackend:
    name = "reference"

    def supports(self, device: torch.device) -> bool:
        return True

    def grouped_mm(self, x, w, groups: Groups):
        y = x.new_zeros(x.shape[0], w.shape[-1])
        for e, s, t in groups.segments():
            if t > s:
                y[s:t] = torch.mm(x[s:t], w[e])
        return y

    def grouped_mm_k(self, a, b, groups: Groups):
        out = a.new_zeros(groups.num_groups, a.shape[0], b.shape[1])
        for e, s, t in groups.segments():
            if t > s:
                out[e] = torch.mm(a[:, s:t], b[s:t])
        return out

    def accumulate_k(self, out, a, b, groups: Groups, *, wgrad_dtype: str):
        for e, s, t in groups.segments():
            if t > s:
                if wgrad_dtype == "input":  # the product in a's dtype (one rounding), then the add
                    out[e].add_(torch.mm(a[:, s:t], b[s:t]))
                else:
                    out[e].add_(torch.mm(a[:, s:t].to(out.dtype), b[s:t].to(out.dtype)))
