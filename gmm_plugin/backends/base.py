"""The small interface every backend implements.

Two grouped products cover forward and backward of every group_type:

* ``grouped_mm(x, w, groups)``: split-M (group_type 0). x [M, K], w [E, K, N] (any strides)
  -> y [M, N], y[rows of group e] = x[rows] @ w[e].
* ``grouped_mm_k(a, b, groups, out=None)``: split-K (group_type 2). a [P, M], b [M, N], the groups
  split M -> [E, P, N], result[e] = a[:, seg e] @ b[seg e, :]. With ``out`` ([E, P, N], any strides,
  possibly float32 while a and b are 16-bit) the products are *added* into ``out`` in place and
  nothing of out's size is allocated: this is gradient-accumulation fusion.

Inputs arrive validated and in a compute dtype the backend supports; empty groups give zeros.
A backend whose ``converts_weight_per_group`` is true gets grouped_mm's w in its own dtype when
that is narrower than x's compute dtype (fp16 weights on a CPU, computed in fp32) and converts
one group at a time, so no fp32 copy of the whole weight is made.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..group_list import Groups


class Backend(Protocol):
    name: str

    def supports(self, device: torch.device) -> bool: ...

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor: ...

    def grouped_mm_k(self, a: torch.Tensor, b: torch.Tensor, groups: Groups,
                     out: torch.Tensor | None = None) -> torch.Tensor: ...
