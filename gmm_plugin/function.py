"""The autograd Function behind npu_gmm / npu_gmm_v2.

Forward and both gradients are grouped products on the chosen backend:

  group_type 0:  y = gmm(x, W)       dx = gmm(dy, W^T)          dW = gmm_k(x^T, dy)  (or into main_grad)
  group_type 2:  y = gmm_k(x, W)     dx^T = gmm(W, dy^T)        dW = gmm(x^T, dy)
  group_type -1: plain matmul.

dW keeps weight's layout: for a transposed view of a contiguous [E, N, K] weight it is computed as
gmm_k(dy^T, x) and returned transposed, with no copy. grad_bias is the per-group sum of dy.

Under create_graph (double backward: grad mode is on in backward) the same gradients are calls of
this Function itself (gmm_k is group_type 2, gmm group_type 0), so autograd can differentiate them
again; a fused weight gradient still goes into main_grad, outside autograd (first order only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fusion
from .backends.base import Backend
from .group_list import Groups
from .layout import is_transposed


@dataclass(frozen=True)
class Call:
    """Everything a call decided in its forward, so its backward does the same."""
    group_type: int
    groups: Groups | None
    backend: Backend
    gemm_fusion: bool
    wgrad_dtype: str  # fused 16-bit weight gradient: "fp32" products or "input" (settings, resolved)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    # CPUs have no fast float16 GEMM (~1 GFLOP/s): compute it in float32 and round once at the end.
    return torch.float32 if t.dtype == torch.float16 and t.device.type == "cpu" else t.dtype


def _weight_in(dtype: torch.dtype, weight: torch.Tensor, call: Call) -> torch.Tensor:
    """The weight for the split-M products: a backend that converts it group by group (the
    torch backend, for fp16 on a CPU) gets it as it is, sparing an fp32 copy of all of it."""
    if call.group_type == 0 and getattr(call.backend, "converts_weight_per_group", False):
        return weight
    return weight.to(dtype)


def _add_bias(y: torch.Tensor, bias: torch.Tensor, call: Call) -> torch.Tensor:
    if call.group_type == 0:
        rows = bias.index_select(0, call.groups.row_group_ids())
    elif call.group_type == 2:
        rows = bias.unsqueeze(1)
    else:
        rows = bias.reshape(-1)
    # Add in the wider of the two dtypes (bf16 x takes an fp32 bias), round once.
    wide = torch.promote_types(y.dtype, bias.dtype)
    return (y.to(wide) + rows.to(wide)).to(y.dtype)


def _bias_grad(grad: torch.Tensor, bias: torch.Tensor, call: Call) -> torch.Tensor:
    g = grad.to(torch.promote_types(grad.dtype, torch.float32))  # 16-bit sums in fp32, float64 kept
    if call.group_type == 2:
        out = g.sum(dim=1)
    elif call.group_type == -1:
        out = g.sum(dim=0).reshape(bias.shape)
    else:
        counts = call.groups.host_counts()
        if counts is not None:  # fixed summation order: deterministic
            out = torch.stack([part.sum(0) for part in torch.split(g, list(counts))]) \
                if counts else g.new_zeros(bias.shape)
        else:
            out = g.new_zeros(bias.shape).index_add_(0, call.groups.row_group_ids(), g)
    return out.to(bias.dtype)


class GroupedMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, original_weight, call: Call):
        dtype = compute_dtype(x)
        xc, wc = x.to(dtype), _weight_in(dtype, weight, call)
        if call.group_type == 0:
            y = call.backend.grouped_mm(xc, wc, call.groups)
        elif call.group_type == 2:
            y = call.backend.grouped_mm_k(xc, wc, call.groups)
        else:
            y = torch.mm(xc, wc)
        if bias is not None:
            y = _add_bias(y, bias, call)
        ctx.call = call
        # original_weight is kept as it is, not saved: saved-tensor hooks (non-reentrant
        # checkpointing, offloading) hand back a plain tensor without its main_grad.
        ctx.original_weight = original_weight
        ctx.save_for_backward(x, weight, bias)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad)
        x, weight, bias = ctx.saved_tensors
        original_weight, call = ctx.original_weight, ctx.call
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = compute_dtype(x)
        # contiguous(): a stride-0 grad (from y.sum()) breaks torch._grouped_mm's backward.
        g = grad.to(dtype).contiguous()
        xc, wc = x.to(dtype), _weight_in(dtype, weight, call)
        gx = gw = gb = None
        backend, groups = call.backend, call.groups
        if call.group_type == 0:
            if need_x:
                gx = backend.grouped_mm(g, wc.transpose(-1, -2), groups)
            if call.gemm_fusion:
                if need_w:
                    backend.accumulate_k(fusion.main_grad_view(original_weight, weight), xc.t(), g, groups,
                                         wgrad_dtype=call.wgrad_dtype)
                    gw = fusion.weight_grad_after_fusion(original_weight, weight)
            elif need_w:
                if is_transposed(weight):
                    gw = backend.grouped_mm_k(g.t(), xc, groups).transpose(-1, -2)
                else:
                    gw = backend.grouped_mm_k(xc.t(), g, groups)
        elif call.group_type == 2:
            if need_x:
                gx = backend.grouped_mm(wc, g.transpose(-1, -2), groups).t()
            if need_w:
                gw = backend.grouped_mm(xc.t(), g, groups)
        else:
            if need_x:
                gx = torch.mm(g, wc.t())
            if need_w:
                gw = torch.mm(xc.t(), g)
        if need_b:
            gb = _bias_grad(grad, bias, call)
        gx = None if gx is None else gx.to(x.dtype)
        gw = None if gw is None else gw.to(weight.dtype)
        return gx, gw, gb, None, None


def _differentiable_backward(ctx, grad):
    """backward as calls of GroupedMatmulFunction (differentiable again), for create_graph."""
    x, weight, bias = ctx.saved_tensors
    original_weight, call = ctx.original_weight, ctx.call
    need_x, need_w, need_b = ctx.needs_input_grad[:3]

    def gmm(a, b, group_type):  # y = a @ b per group: group_type 0 splits a's rows, 2 the inner axis
        return GroupedMatmulFunction.apply(a, b, None, None, Call(group_type, call.groups, call.backend,
                                                                  False, call.wgrad_dtype))
    gx = gw = gb = None
    if call.group_type == 0:
        if need_x:
            gx = gmm(grad, weight.transpose(-1, -2), 0)
        if need_w and call.gemm_fusion:
            with torch.no_grad():  # main_grad is a buffer: the first-order gradient only
                dtype = compute_dtype(x)
                call.backend.accumulate_k(fusion.main_grad_view(original_weight, weight), x.to(dtype).t(),
                                          grad.to(dtype).contiguous(), call.groups, wgrad_dtype=call.wgrad_dtype)
            gw = fusion.weight_grad_after_fusion(original_weight, weight)
        elif need_w:
            gw = gmm(x.t(), grad, 2)
    elif call.group_type == 2:
        if need_x:
            gx = gmm(weight, grad.transpose(-1, -2), 0).t()
        if need_w:
            gw = gmm(x.t(), grad, 0)
    else:
        if need_x:
            gx = torch.mm(grad, weight.t())
        if need_w:
            gw = torch.mm(x.t(), grad)
    if need_b:
        gb = _bias_grad(grad, bias, call)
    return gx, gw, gb, None, None
