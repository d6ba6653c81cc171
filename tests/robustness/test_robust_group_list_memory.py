"""Memory safety of group_list: hostile values never make a backend touch memory outside x.

* Host data (a list or a CPU tensor) is checked before any kernel runs: an immediate ValueError.
* Device data (an accelerator tensor) is never read on the host: it gets an asynchronous device
  assert, and its offsets are clamped (Groups.safe_offsets) so every kernel stays in bounds
  whatever the assert says. That path is tested here on CPU tensors by building Groups with
  host=None, exactly as make_groups does for device data, then running torch._grouped_mm, every
  backend and the autograd Function on the offsets the plugin computes, with NaN canaries around
  the operands (a read outside them would surface as NaN) and around an accumulation target (a
  write outside it would change them).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, strategies as st

from gmm_plugin import checks, npu_gmm, npu_gmm_v2
from gmm_plugin.function import Call, GroupedMatmulFunction
from gmm_plugin.group_list import Groups
from robust_support import (count, cpu_backends, expect, names_argument, reference_forward, reference_grads,
                            robust_settings, using_backend, within)

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
hostile_value = st.one_of(
    st.integers(-3, 15),
    st.sampled_from([INT64_MAX, INT64_MIN, 2**62, 2**31, 2**31 - 1, 2**32 + 1, -2**31, -1]),
    st.integers(INT64_MIN, INT64_MAX))


@st.composite
def hostile_groups(draw, max_total=12):
    values = draw(st.lists(hostile_value, min_size=1, max_size=8), label="values")
    total = draw(st.integers(0, max_total), label="total")
    cumsum = draw(st.booleans(), label="cumsum")
    if draw(st.integers(0, 3)) == 0:  # sometimes valid data: clamping must not change it
        counts = draw(st.lists(st.integers(0, 4), min_size=len(values), max_size=len(values)))
        total = sum(counts)
        values = list(itertools.accumulate(counts)) if cumsum else counts
    return values, total, cumsum


def device_groups(values, total, cumsum):
    """Groups as make_groups builds them for accelerator data: no host copy of the values."""
    return Groups(cumsum, torch.tensor(values, dtype=torch.int64), total, host=None)


def model_counts(values, total):
    """Independent model of the clamped sizes of a counts group_list (Python ints: no overflow):
    each clamped to [0, total]; rows left over go to the last group; on an overrun every row goes
    to the last group (nothing can be trusted then)."""
    c = [min(max(v, 0), total) for v in values]
    if sum(c) <= total:
        return c[:-1] + [c[-1] + total - sum(c)]
    return [0] * (len(c) - 1) + [total]


def model_ends(values, total, cumsum):
    """Independent model of the clamped end offsets: each inside [0, total], non-decreasing, the
    last at total, so every row belongs to exactly one group."""
    if not cumsum:
        return list(itertools.accumulate(model_counts(values, total)))
    ends = list(itertools.accumulate((min(max(v, 0), total) for v in values), max))
    return ends[:-1] + [total]


def host_valid(values, total, cumsum):
    try:
        checks.check_group_list_values(list(values), cumsum=cumsum, total=total, axis="rows")
        return True
    except ValueError:
        return False


# ---- the offsets ---------------------------------------------------------------------------------

@robust_settings(300)
@given(case=hostile_groups())
@example(case=([1, INT64_MAX, 0], 5, False))           # int64 cumsum of the counts would wrap
@example(case=([2**62, 2**62, 2**62, 0], 5, False))
@example(case=([INT64_MIN, INT64_MAX, 3], 5, False))
@example(case=([-1, 3, 2], 4, True))                   # negative and decreasing offsets
@example(case=([0], 1, False))                         # covers too little: last group takes the rest
def test_safe_offsets_stay_in_bounds(case):
    values, total, cumsum = case
    count("cases_generated")
    count("hostile_group_lists")
    groups = device_groups(values, total, cumsum)
    e = len(values)
    for dtype in (torch.int32, torch.int64):
        offs = groups.safe_offsets(dtype)
        expect(offs.dtype == dtype and offs.shape == (e,), f"offsets {offs}")
        o = offs.tolist()
        expect(all(0 <= a <= total for a in o) and o == sorted(o) and o[-1] == total,
               f"offsets {o} leave [0, {total}] or decrease, for {values}")
        expect(o == model_ends(values, total, cumsum), f"offsets {o} != clamped model "
               f"{model_ends(values, total, cumsum)} for {values}")
    counts = groups.counts().tolist()  # what count-based kernels (npu backend) get
    expect(len(counts) == e and min(counts) >= 0 and sum(counts) == total,
           f"counts() {counts} of a device group_list {values} must be safe sizes summing to {total}")
    expect(counts == safe_counts(values, total, cumsum),  # the same groups as the offsets
           f"counts() {counts} != clamped model {safe_counts(values, total, cumsum)} for {values}")
    if host_valid(values, total, cumsum):
        true_counts = list(values) if not cumsum else [b - a for a, b in zip([0] + values[:-1], values)]
        expect(counts == true_counts, f"counts() changed valid counts {true_counts} into {counts}")
    ids = groups.row_group_ids()
    expect(ids.shape == (total,) and (total == 0 or (0 <= ids.min() and ids.max() < e)),
           f"row_group_ids out of range: {ids}")
    if host_valid(values, total, cumsum):  # clamping is the identity on good data
        true_ends = list(values) if cumsum else list(itertools.accumulate(values))
        expect(o == true_ends, f"clamping changed valid offsets {true_ends} into {o}")


@robust_settings(200)
@given(case=hostile_groups())
def test_device_assert_agrees_with_host_check(case):
    """The asynchronous device assert rejects exactly what the host check rejects (on CPU it
    fires at once, as torch._assert_async does there)."""
    values, total, cumsum = case
    count("cases_generated")
    count("hostile_group_lists")
    try:
        checks.assert_group_list_async(torch.tensor(values, dtype=torch.int64), cumsum=cumsum, total=total)
        fired = False
    except RuntimeError as e:
        fired = True
        expect(names_argument(str(e), "group_list"), f"assert message does not name group_list: {e}")
    expect(fired != host_valid(values, total, cumsum),
           f"device assert {'fired' if fired else 'passed'} but host check says "
           f"{'valid' if host_valid(values, total, cumsum) else 'invalid'} for {values}, total {total}")


# ---- kernels on those offsets --------------------------------------------------------------------

PAD = 4  # canary rows/columns of NaN around every operand


def canaried(rows, cols, gen, dtype):
    """A [rows, cols] view in the middle of a NaN buffer, 16-byte aligned for torch._grouped_mm."""
    width = -(-(cols + PAD) // 8) * 8
    buf = torch.full((rows + 2 * PAD, width), float("nan"), dtype=dtype)
    buf[PAD:PAD + rows, :cols] = torch.randn(rows, cols, generator=gen).to(dtype)
    return buf[PAD:PAD + rows, :cols]


def safe_counts(values, total, cumsum):
    ends = model_ends(values, total, cumsum)
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


@robust_settings(150)
@given(case=hostile_groups(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 1000))
def test_grouped_mm_kernel_on_plugin_offsets(case, dtype, seed):
    """torch._grouped_mm called directly on Groups.safe_offsets(): in bounds, no garbage."""
    values, total, cumsum = case
    count("cases_generated")
    count("hostile_group_lists")
    if total == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    e, k, n = len(values), 8, 8
    offs = device_groups(values, total, cumsum).safe_offsets()
    counts = safe_counts(values, total, cumsum)
    x = canaried(total, k, gen, dtype)
    w = torch.randn(e, k, n, generator=gen).to(dtype)
    y = torch._grouped_mm(x, w, offs)  # split M
    expect(within(y, *reference_forward(x, w, counts, 0), dtype, k), f"split-M on {offs.tolist()}")
    a = canaried(k, total, gen, dtype)  # [K', M], rows of a NaN buffer: columns past M are NaN
    b = canaried(total, n, gen, dtype)
    y2 = torch._grouped_mm(a, b, offs)  # split K
    expect(within(y2, *reference_forward(a, b, counts, 2), dtype, max(counts)), f"split-K on {offs.tolist()}")


@pytest.mark.parametrize("backend", cpu_backends())
@robust_settings(120)
@given(case=hostile_groups(), seed=st.integers(0, 1000))
def test_backends_and_autograd_on_device_groups(backend, case, seed):
    """Every backend (forward, backward, bias, accumulation into an out buffer) on a hostile
    device-style group_list: results are those of the clamped groups, canaries untouched."""
    values, total, cumsum = case
    count("cases_generated")
    count("hostile_group_lists")
    gen = torch.Generator().manual_seed(seed)
    counts = safe_counts(values, total, cumsum)
    with using_backend(backend) as impl:
        _device_groups_case(impl, backend, values, total, cumsum, counts, gen)


def _device_groups_case(impl, backend, values, total, cumsum, counts, gen):
    e, k, n, dtype = len(values), 8, 8, torch.float32

    # Split M through the autograd Function, with bias, forward and backward.
    x = canaried(total, k, gen, dtype).requires_grad_(False)
    xg = x.detach().clone().requires_grad_(True)
    w = torch.randn(e, k, n, generator=gen, requires_grad=True)
    bias = torch.randn(e, n, generator=gen, requires_grad=True)
    call = Call(0, device_groups(values, total, cumsum), impl, False, "fp32")
    y = GroupedMatmulFunction.apply(xg, w, bias, None, call)
    expect(within(y, *reference_forward(x, w, counts, 0, bias), dtype, k), f"{backend} split-M forward")
    y_canary = GroupedMatmulFunction.apply(x, w.detach(), None, None, call)  # reads the canaried view
    expect(within(y_canary, *reference_forward(x, w, counts, 0), dtype, k), f"{backend} read outside x")
    g = torch.randn(total, n, generator=gen)
    refs = reference_grads(x, w, counts, 0, g, bias.shape)
    dx, dw, db = torch.autograd.grad(y, [xg, w, bias], g)
    expect(within(dx, *refs["x"], dtype, n) and within(dw, *refs["weight"], dtype, max(total, 1))
           and within(db, *refs["bias"], dtype, max(total, 1)), f"{backend} split-M backward")

    # Split K, accumulating into a view of a canaried buffer (gemm_fusion's main_grad path).
    a = canaried(k, total, gen, dtype)
    b = canaried(total, n, gen, dtype)
    groups = device_groups(values, total, cumsum)
    buf = torch.full((e + 2, k, n), 7.0)
    out = buf[1:1 + e]
    impl.accumulate_k(out, a, b, groups, wgrad_dtype="fp32")
    ref, mag = reference_forward(a, b, counts, 2)
    expect(within(out, ref + 7.0, mag + 7.0, dtype, max(counts) + 1), f"{backend} split-K accumulate")
    expect(bool((buf[0] == 7).all() and (buf[-1] == 7).all()), f"{backend} wrote outside out")
    expect(within(impl.grouped_mm_k(a, b, groups), ref, mag, dtype, max(counts)), f"{backend} split-K")


# ---- host data: an immediate error ---------------------------------------------------------------

@pytest.mark.parametrize("api,values", [
    (npu_gmm_v2, [3, 9]), (npu_gmm_v2, [-4, 10]), (npu_gmm_v2, [2**62, 2**62 + 6]), (npu_gmm_v2, [2**63 - 1, 7]),
    (npu_gmm, [3, 9]), (npu_gmm, [-1, 6]), (npu_gmm, [5, 2**62]), (npu_gmm, [7, 6]), (npu_gmm, [2**63 - 1, 6]),
])
@pytest.mark.parametrize("form", ["list", "tensor"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_host_group_list_overrun_is_an_immediate_error(api, values, form, backend):
    count("invalid_inputs")
    gl = values if form == "list" else torch.tensor(values, dtype=torch.int64)
    x, w = torch.randn(6, 4), torch.randn(2, 4, 3)
    with using_backend(backend), pytest.raises(ValueError, match="group_list"):
        api(x, w, group_list=gl)
