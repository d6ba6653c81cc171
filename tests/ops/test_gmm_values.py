"""npu_gmm / npu_gmm_v2 against the float64 per-group reference: every combination, forward and backward."""
from __future__ import annotations

import random

import pytest
import torch

import gmm_plugin
from gmm_plugin.ops import gmm
from reference import gmm_reference, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_counts(num_groups: int, total: int, rng: random.Random, empty: bool = True) -> list[int]:
    """Uneven sizes summing to total, with some empty groups when there are several."""
    cuts = sorted(rng.randint(0, total) for _ in range(num_groups - 1))
    counts = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    if empty and num_groups > 2:  # force at least one empty group in the middle
        i = num_groups // 2
        counts[i + 1 if i + 1 < num_groups else 0] += counts[i]
        counts[i] = 0
    return counts


def as_group_list(counts, api, form, device="cpu"):
    values = counts if api == "v2" else torch.tensor(counts).cumsum(0).tolist()
    return torch.tensor(values, dtype=torch.int64, device=device) if form == "tensor" else values


def call(api, *args, **kwargs):
    return (gmm.npu_gmm_v2 if api == "v2" else gmm.npu_gmm)(*args, **kwargs)


def make_weight(shape, dtype, transposed):
    """A leaf weight; 'transposed' is a .transpose(-1, -2) view of a contiguous [.., N, K] tensor."""
    if transposed:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype)
        base.requires_grad_(True)
        return base, base.transpose(-1, -2)
    w = torch.randn(*shape, dtype=dtype, requires_grad=True)
    return w, w


def check_case(backend, group_type, api, form, transposed, with_bias, dtype, num_groups, m=37, k=16, n=24, seed=0):
    rng = random.Random(seed)
    counts = random_counts(num_groups, m, rng)
    group_list = as_group_list(counts, api, form)
    bias = None
    if with_bias:
        bias = torch.randn(num_groups, n, dtype=gmm_plugin.checks.bias_dtype_for(dtype), requires_grad=True)
    if group_type == 0:
        x = torch.randn(m, k, dtype=dtype, requires_grad=True)
        leaf_w, w = make_weight((num_groups, k, n), dtype, transposed)
        x_in, ref_x = x, x
    else:  # group_type 2: x is [K', M], typically a transposed view of [M, K'] activations
        base = torch.randn(m, k, dtype=dtype, requires_grad=True)
        x = base
        x_in = base.t()
        leaf_w, w = make_weight((m, n), dtype, transposed)
        ref_x = x_in
    y = call(api, x_in, w, bias=bias, group_list=group_list, group_type=group_type)

    # float64 reference with autograd for the gradients
    rx = ref_x.detach().double().requires_grad_(True)
    rw = w.detach().double().requires_grad_(True)
    rb = None if bias is None else bias.detach().double().requires_grad_(True)
    ry = gmm_reference(rx, rw, counts, group_type, rb)
    assert y.dtype == dtype and y.shape == ry.shape
    red = k if group_type == 0 else max(counts)
    assert (y.double() - ry).abs().max().item() <= tolerance(dtype, red, ry.abs().max().item())

    g = torch.randn(ry.shape, dtype=dtype)  # the reference sees the same (rounded) output gradient
    ry.backward(g.double())
    y.backward(g)
    gx = x.grad if group_type == 0 else x.grad.t()
    leaf_grad = leaf_w.grad if not transposed else leaf_w.grad.transpose(-1, -2)
    for name, got, want, k_red in (("x", gx, rx.grad, n if group_type == 0 else n),
                                   ("weight", leaf_grad, rw.grad, m),
                                   ("bias", None if bias is None else bias.grad, None if rb is None else rb.grad, m)):
        if want is None:
            continue
        tol = tolerance(got.dtype, k_red, want.abs().max().item())
        err = (got.double() - want).abs().max().item()
        assert err <= tol, f"grad {name}: max error {err} > {tol}"
    if transposed:  # dW keeps weight's layout: the leaf's gradient is contiguous like the leaf
        assert leaf_w.grad.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("num_groups", [1, 3, 8, 64])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("form", ["list", "tensor"])
@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("group_type", [0, 2])
def test_against_reference(backend, group_type, api, form, transposed, with_bias, dtype, num_groups):
    m = 37 if num_groups < 64 else 150
    check_case(backend, group_type, api, form, transposed, with_bias, dtype, num_groups, m=m)


@pytest.mark.parametrize("shape", [(5, 3, 7), (9, 1, 1), (40, 17, 33)])
def test_unaligned_shapes_use_a_correct_path(backend, shape):
    """K/N whose strides torch._grouped_mm rejects (not 16-byte multiples) still give right answers."""
    m, k, n = shape
    for dtype in DTYPES:
        check_case(backend, 0, "v2", "tensor", False, True, dtype, 3, m=m, k=k, n=n)
        check_case(backend, 2, "v1", "list", True, False, dtype, 3, m=m, k=k, n=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_type_minus_one_is_plain_matmul(backend, dtype, with_bias):
    x = torch.randn(13, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(16, 24, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, dtype=gmm_plugin.checks.bias_dtype_for(dtype), requires_grad=True) if with_bias else None
    y = gmm.npu_gmm(x, w, bias=bias, group_type=-1)
    ry = gmm_reference(x, w, None, -1, bias)
    assert (y.double() - ry).abs().max() <= tolerance(dtype, 16, ry.abs().max().item())
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad.double(), torch.ones(13, 24, dtype=torch.float64) @ w.detach().double().t(),
                          rtol=0, atol=tolerance(dtype, 24, 24 * w.abs().max().item()))
    if with_bias:
        assert torch.allclose(bias.grad.double(), torch.full((24,), 13.0, dtype=torch.float64))


def test_fp16_on_cpu_is_computed_in_fp32_and_returned_fp16(backend):
    x = torch.randn(64, 32).half()
    w = torch.randn(4, 32, 16).half()
    y = gmm.npu_gmm_v2(x, w, group_list=torch.tensor([10, 20, 30, 4]))
    assert y.dtype == torch.float16
    ref = gmm_reference(x, w, [10, 20, 30, 4])
    # one rounding of an fp32-accurate result: within half an fp16 ulp of the float64 truth
    assert ((y.double() - ref).abs() <= ref.abs() * 2.0 ** -11 + 2.0 ** -24).all()
