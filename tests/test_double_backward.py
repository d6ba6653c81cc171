"""Double backward (create_graph=True) of npu_gmm on every backend: the gradients are themselves
differentiable (issue 21 item 5: 39daed2's torch backend raised `mm(): functions with out=...
arguments don't support automatic differentiation`)."""
from __future__ import annotations

import pytest
import torch

from gmm_plugin.backends import get_backend
from gmm_plugin.function import Call, GroupedMatmulFunction
from gmm_plugin.group_list import make_groups
from gmm_plugin.ops import gmm
from reference import gmm_reference

COUNTS = [2, 0, 3, 1]  # an empty group among them


def _operands(group_type, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    e, m = len(COUNTS), sum(COUNTS)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    if group_type == 0:
        x, w = t(m, 3), t(e, 3, 5)
    else:
        x, w = t(3, m), t(m, 5)
    b = t(e, 5) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("group_type", [0, 2])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradgradcheck_float64(backend, group_type, bias):
    """float64 through the Function itself (the public call takes 16/32-bit dtypes only)."""
    x, w, b = _operands(group_type, bias)
    groups = make_groups(COUNTS, cumsum=False, total=sum(COUNTS), device=x.device, axis="M")
    call = Call(group_type, groups, get_backend(backend), False, "input")
    inputs = (x, w) + ((b,) if bias else ())

    def fn(x, w, b=None):
        return GroupedMatmulFunction.apply(x, w, b, None, call)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("group_type", [0, 2, -1])
@pytest.mark.parametrize("backend_name", ["torch", "reference"])
def test_second_order_gradients_match_a_float64_mm_loop(backend_name, group_type):
    """fp32 public call, create_graph, a second backward: against the float64 per-group loop."""
    from gmm_plugin import settings
    if group_type == -1:
        x, w = (torch.randn(6, 3, dtype=torch.float64).requires_grad_(),
                torch.randn(3, 5, dtype=torch.float64).requires_grad_())
        counts, group_list = None, None
    else:
        x, w, _ = _operands(group_type, False)
        counts, group_list = COUNTS, COUNTS
    results = []
    for impl in ("plugin", "reference"):
        xi = x.detach().float().requires_grad_() if impl == "plugin" else x.detach().clone().requires_grad_()
        wi = w.detach().float().requires_grad_() if impl == "plugin" else w.detach().clone().requires_grad_()
        if impl == "plugin":
            with settings(backend=backend_name):
                y = gmm.npu_gmm_v2(xi, wi, group_list=group_list, group_type=group_type)
        else:
            y = gmm_reference(xi, wi, counts, group_type)
        gx, gw = torch.autograd.grad((y ** 2).sum(), (xi, wi), create_graph=True)
        hx, hw = torch.autograd.grad((gx ** 2).sum() + (gw * gw.detach()).sum(), (xi, wi))
        results.append([t.double() for t in (gx, gw, hx, hw)])
    for got, want in zip(*results):  # values are O(10-100) after two products over <= 6 terms: fp32
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


def test_create_graph_with_gemm_fusion_adds_the_first_order_gradient_into_main_grad():
    x, w, _ = _operands(0, False, dtype=torch.float32)
    p = torch.nn.Parameter(w.detach().clone())
    p.main_grad = torch.zeros(p.shape)
    xi = x.detach().clone().requires_grad_()
    y = gmm.npu_gmm_v2(xi, p, group_list=COUNTS, gemm_fusion=True, original_weight=p)
    (gx,) = torch.autograd.grad((y ** 2).sum(), (xi,), create_graph=True)
    first = p.main_grad.clone()  # every backward pass through the call adds its weight gradient
    (hx,) = torch.autograd.grad((gx ** 2).sum(), (xi,))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = gmm_reference(xr, wr, COUNTS)
    gxr, gwr = torch.autograd.grad((yr ** 2).sum(), (xr, wr), create_graph=True)
    (hxr,) = torch.autograd.grad((gxr ** 2).sum(), (xr,))
    assert torch.allclose(first.double(), gwr, rtol=1e-5, atol=1e-4)  # first order, in main_grad
    assert torch.allclose(hx.double(), hxr, rtol=1e-5, atol=1e-4)
