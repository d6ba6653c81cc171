"""The small interface every backend implements.

Three operations cover forward and backward of every group_type:

* ``grouped_mm(x, w, groups) -> y``: split M (group_type 0). x [M, K], w [E, K, N] (any
  strides) -> y [M, N], y[rows of group e] = x[rows] @ w[e].
* ``grouped_mm_k(a, b, groups) -> r``: split K (group_type 2). a [P, M], b [M, N], the groups
  split M -> a fresh [E, P, N], r[e] = a[:, seg e] @ b[seg e, :].
* ``accumulate_k(out, a, b, groups, *, wgrad_dtype) -> None``: the same products *added* into
  ``out`` [E, P, N] in place (any strides; float32 while a and b may be 16-bit): gradient-
  accumulation fusion into main_grad. ``wgrad_dtype`` is resolved by the caller: "fp32" (fp32
  products and sums) or "input" (each group's product in a's dtype, then the add). Nothing of
  out's size may be allocated.

Inputs arrive validated and in a compute dtype the backend supports; empty groups give zeros
(grouped_mm_k) or leave out untouched (accumulate_k). Group sizes come from ``groups``
(gmm_plugin.group_list.Groups): ``segments()`` on the host, or the device tensors; a backend
never reads them back from an accelerator itself. A backend whose ``converts_weight_per_group``
is true gets grouped_mm's w in its own dtype when that is narrower than x's compute dtype (fp16
weights on a CPU, computed in fp32) and converts one group at a time.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..group_list import Groups


class Backend(Protocol):
    name: str

    def supports(self, device: torch.device) -> bool: ...

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor: ...

    def grouped_mm_k(self, a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor: ...

    def accumulate_k(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: Groups, *,
                     wgrad_dtype: str) -> None: ...
