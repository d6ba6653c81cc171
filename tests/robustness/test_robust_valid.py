"""Property-based: every valid npu_gmm / npu_gmm_v2 call matches the float64 reference, forward and
backward, on every CPU backend, for random shapes (zero rows, empty groups, one or many groups, K or
N of 0), dtypes, group_list forms, memory layouts, bias and gemm_fusion into a fake main_grad."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, strategies as st

import gmm_plugin
from gmm_plugin import npu_gmm, npu_gmm_v2
from robust_support import (DTYPES, LAYOUTS_2D, LAYOUTS_3D, bias_dtype, count, cpu_backends, expect,
                            leaf_2d, leaf_3d, randn, reference_forward, reference_grads, robust_settings,
                            using_backend, within)

BACKENDS = cpu_backends()
small = st.integers(0, 6)


@st.composite
def group_counts(draw, max_groups=10):
    """Per-group sizes: one group, many groups, empty groups, all empty (zero rows)."""
    e = draw(st.one_of(st.just(1), st.integers(1, max_groups)))
    shape = draw(st.sampled_from(["mixed", "mixed", "all_empty", "one_full"]))
    if shape == "all_empty":
        return [0] * e
    if shape == "one_full":
        c = [0] * e
        c[draw(st.integers(0, e - 1))] = draw(st.integers(1, 9))
        return c
    return draw(st.lists(st.one_of(st.just(0), st.integers(0, 5)), min_size=e, max_size=e))


def group_list_of(counts, cumsum, form):
    values = list(itertools.accumulate(counts)) if cumsum else list(counts)
    return values if form == "list" else torch.tensor(values, dtype=torch.int64)


def _call(data, x, w, bias, counts, group_type, **kw):
    api = data.draw(st.sampled_from([npu_gmm, npu_gmm_v2]), label="api")
    form = data.draw(st.sampled_from(["list", "tensor"]), label="group_list form")
    gl = None if group_type == -1 else group_list_of(counts, api is npu_gmm, form)
    try:
        return api(x, w, bias=bias, group_list=gl, group_type=group_type, **kw)
    except Exception:
        count("crashes")
        raise


def _check(name, actual, ref_mag, dtype, k):
    ref, mag = ref_mag
    if not within(actual, ref, mag, dtype, k):
        err = (actual.detach().double() - ref).abs().max().item() \
            if actual is not None and actual.shape == ref.shape and actual.numel() else actual
        expect(False, f"{name} differs from the float64 reference: max error {err}")


@pytest.mark.parametrize("backend", BACKENDS)
@robust_settings(400)
@given(data=st.data())
def test_split_m_matches_reference(backend, data):
    """group_type 0: x [M, K] @ weight [E, K, N] per row group, with and without gemm_fusion."""
    count("cases_generated")
    with using_backend(backend):
        _split_m_case(data)
    count("valid_cases")


def _split_m_case(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    counts = data.draw(group_counts(), label="counts")
    e, m = len(counts), sum(counts)
    k, n = data.draw(small, label="K"), data.draw(small, label="N")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    fusion = data.draw(st.booleans(), label="gemm_fusion")
    # how the torch backend computes a 16-bit fused dW (others always keep fp32 products)
    wgrad_dtype = data.draw(st.sampled_from(["fp32", "input"]), label="fused_wgrad_dtype") if fusion else "fp32"
    _, x = leaf_2d(m, k, data.draw(st.sampled_from(LAYOUTS_2D), label="x layout"), dtype, gen, True)
    original = main_grad0 = make = None
    if fusion:
        # A Megatron-style Parameter with a fake main_grad; weight is a view of it.
        view = data.draw(st.sampled_from(["same", "transposed", "flat"]), label="param view")
        shape, make = {"same": ((e, k, n), lambda p: p), "transposed": ((e, n, k), lambda p: p.transpose(-1, -2)),
                       "flat": ((k, e * n), lambda p: p.view(e, k, n))}[view]
        original = torch.nn.Parameter(randn(shape, dtype, gen))
        original.main_grad = torch.randn(shape, generator=gen)  # fp32, as Megatron's DDP buffer
        if data.draw(st.booleans(), label="DDP-owned"):
            original.grad_added_to_main_grad = False
        main_grad0 = original.main_grad.clone()
        w = make(original)
    else:
        _, w = leaf_3d(e, k, n, data.draw(st.sampled_from(LAYOUTS_3D), label="w layout"), dtype, gen, True)
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias = randn((e, n), bias_dtype(dtype), gen).requires_grad_(True)

    if fusion and not x.is_leaf:
        x.retain_grad()
    with gmm_plugin.settings(fused_wgrad_dtype=wgrad_dtype):
        _split_m_checks(data, x, w, bias, counts, gen, fusion, original, main_grad0, make, dtype, wgrad_dtype, k)


def _split_m_checks(data, x, w, bias, counts, gen, fusion, original, main_grad0, make, dtype, wgrad_dtype, k):
    m, n = x.shape[0], w.shape[-1]
    y = _call(data, x, w, bias, counts, 0, gemm_fusion=fusion, original_weight=original)
    _check("y", y, reference_forward(x, w, counts, 0, bias), dtype, k)
    expect(y.dtype == dtype and y.shape == (m, n), f"y has dtype {y.dtype} shape {tuple(y.shape)}")

    g = randn((m, n), dtype, gen)
    refs = reference_grads(x, w, counts, 0, g, None if bias is None else bias.shape)
    if fusion:
        y.backward(g)
        _check("dx", x.grad, refs["x"], dtype, n)
        # main_grad += dW through the same view; nothing else in main_grad changes.
        expected, exp_mag = main_grad0.double(), main_grad0.double().abs()
        make(expected).add_(refs["weight"][0])
        make(exp_mag).add_(refs["weight"][1])
        # "input": each group's dW rounded once to the operands' dtype before the fp32 add
        rounded = dtype if wgrad_dtype == "input" else torch.float32
        expect(within(original.main_grad, expected, exp_mag, rounded, m + 1), "main_grad after fusion")
        if hasattr(original, "grad_added_to_main_grad"):
            expect(original.grad_added_to_main_grad is True, "grad_added_to_main_grad not set")
        else:
            expect(original.grad is None, "fusion without DDP must not return a weight gradient")
        if bias is not None:
            _check("dbias", bias.grad, refs["bias"], bias.dtype, m)
    else:
        inputs = [x, w] + ([bias] if bias is not None else [])
        grads = torch.autograd.grad(y, inputs, g)
        _check("dx", grads[0], refs["x"], dtype, n)
        _check("dweight", grads[1], refs["weight"], dtype, m)
        if bias is not None:
            _check("dbias", grads[2], refs["bias"], bias.dtype, m)


@pytest.mark.parametrize("backend", BACKENDS)
@robust_settings(250)
@given(data=st.data())
def test_split_k_matches_reference(backend, data):
    """group_type 2: x [K', M] split along M, weight [M, N] -> y [E, K', N]."""
    count("cases_generated")
    with using_backend(backend):
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        counts = data.draw(group_counts(), label="counts")
        e, m = len(counts), sum(counts)
        p, n = data.draw(small, label="K'"), data.draw(small, label="N")
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
        _, x = leaf_2d(p, m, data.draw(st.sampled_from(LAYOUTS_2D), label="x layout"), dtype, gen, True)
        _, w = leaf_2d(m, n, data.draw(st.sampled_from(LAYOUTS_2D), label="w layout"), dtype, gen, True)
        bias = randn((e, n), bias_dtype(dtype), gen).requires_grad_(True) \
            if data.draw(st.booleans(), label="bias") else None
        y = _call(data, x, w, bias, counts, 2)
        _check("y", y, reference_forward(x, w, counts, 2, bias), dtype, max(counts))
        g = randn((e, p, n), dtype, gen)
        refs = reference_grads(x, w, counts, 2, g, None if bias is None else bias.shape)
        grads = torch.autograd.grad(y, [x, w] + ([bias] if bias is not None else []), g)
        _check("dx", grads[0], refs["x"], dtype, n)
        _check("dweight", grads[1], refs["weight"], dtype, p)
        if bias is not None:
            _check("dbias", grads[2], refs["bias"], bias.dtype, p)
    count("valid_cases")


@robust_settings(100)
@given(data=st.data())
def test_plain_matmul_matches_reference(data):
    """group_type -1: a plain matmul with an optional [N] or [1, N] bias."""
    count("cases_generated")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    m, k, n = data.draw(small), data.draw(small), data.draw(small)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    _, x = leaf_2d(m, k, data.draw(st.sampled_from(LAYOUTS_2D)), dtype, gen, True)
    _, w = leaf_2d(k, n, data.draw(st.sampled_from(LAYOUTS_2D)), dtype, gen, True)
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias = randn(data.draw(st.sampled_from([(n,), (1, n)])), bias_dtype(dtype), gen).requires_grad_(True)
    y = _call(data, x, w, bias, None, -1)
    _check("y", y, reference_forward(x, w, None, -1, bias), dtype, k)
    g = randn((m, n), dtype, gen)
    refs = reference_grads(x, w, None, -1, g, None if bias is None else bias.shape)
    grads = torch.autograd.grad(y, [x, w] + ([bias] if bias is not None else []), g)
    _check("dx", grads[0], refs["x"], dtype, n)
    _check("dweight", grads[1], refs["weight"], dtype, m)
    if bias is not None:
        _check("dbias", grads[2], refs["bias"], bias.dtype, m)
    count("valid_cases")
