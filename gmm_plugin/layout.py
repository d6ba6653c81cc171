"""Operand layouts: the one test of "a transposed view" every module uses."""
from __future__ import annotations

import torch


def is_transposed(t: torch.Tensor) -> bool:
    """A .transpose(-1, -2) view of a contiguous tensor that is not itself contiguous.

    This is MindSpeed's and CANN's transposed-operand rule (stride[-2] == 1, stride[-1] ==
    shape[-2], packed batch strides). A tensor that is both (a size-1 last dim, say) counts as
    contiguous, so every caller takes the plain path for it.
    """
    return t.dim() >= 2 and not t.is_contiguous() and t.transpose(-1, -2).is_contiguous()
