"""Property-based: hostile arguments to npu_gmm / npu_gmm_v2 raise TypeError or ValueError whose
message names the argument, never crash, and leave their inputs (main_grad included) untouched.

Each example draws a valid call (group_type 0, 2 or -1, list or tensor group_list, optional bias
and gemm_fusion) and breaks exactly one thing in it.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from gmm_plugin import npu_gmm, npu_gmm_v2
from robust_support import (DTYPES, bias_dtype, count, cpu_backends, expect, names_argument, randn,
                            robust_settings, using_backend)

HUGE = [2**31, 2**32 + 1, 2**62, 2**63 - 1, -2**63, 2**64, 2**100, -2**70]

# name -> (group types it applies to, argument the message must name, exception types)
MUTATIONS: dict[str, tuple[tuple[int, ...], str, tuple[type, ...]]] = {}


def mutation(name, arg, types=(0, 2), exc=(TypeError, ValueError)):
    def register(fn):
        MUTATIONS[name] = (types, arg, exc, fn)
        return fn
    return register


# ---- group_list: types and dims ------------------------------------------------------------------
for _dt in (torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32, torch.float64):
    mutation(f"group_list dtype {_dt}", "group_list")(
        lambda c, d, dt=_dt: c.update(group_list=torch.tensor(c["values"]).to(dt)))
mutation("group_list 2-D", "group_list")(lambda c, d: c.update(group_list=torch.tensor([c["values"]])))
mutation("group_list 0-D", "group_list")(lambda c, d: c.update(group_list=torch.tensor(c["total"])))
mutation("group_list empty list", "group_list")(lambda c, d: c.update(group_list=[]))
mutation("group_list empty tensor", "group_list")(
    lambda c, d: c.update(group_list=torch.zeros(0, dtype=torch.int64)))
mutation("group_list None", "group_list")(lambda c, d: c.update(group_list=None))
mutation("group_list numpy", "group_list")(lambda c, d: c.update(group_list=np.array(c["values"])))
mutation("group_list string", "group_list")(lambda c, d: c.update(group_list=",".join(map(str, c["values"]))))
mutation("group_list dict", "group_list")(lambda c, d: c.update(group_list=dict(enumerate(c["values"]))))
mutation("group_list with a float", "group_list")(
    lambda c, d: c["group_list"].__setitem__(d.draw(st.integers(0, len(c["values"]) - 1)), 1.0)
    if isinstance(c["group_list"], list) else c.update(group_list=[float(v) for v in c["values"]]))
mutation("group_list with a bool", "group_list")(
    lambda c, d: c.update(group_list=[True] + list(c["values"][1:])))
mutation("group_list nested", "group_list")(lambda c, d: c.update(group_list=[[v] for v in c["values"]]))
mutation("group_list with numpy ints", "group_list")(lambda c, d: c.update(group_list=list(np.array(c["values"]))))
mutation("group_list with grad", "group_list")(
    lambda c, d: c.update(group_list=torch.tensor(c["values"], dtype=torch.float32, requires_grad=True)))
mutation("group_list for group_type -1", "group_list", types=(-1,))(lambda c, d: c.update(group_list=[0]))
mutation("group_list on another device", "group_list", exc=(RuntimeError,))(
    lambda c, d: c.update(group_list=torch.tensor(c["values"], device="meta")))


# ---- group_list: values (list and tensor forms) ---------------------------------------------------
def _set_values(c, values):
    c["group_list"] = list(values) if isinstance(c["group_list"], list) else torch.tensor(values, dtype=torch.int64)


def _counts_to_values(c, counts):
    return list(itertools.accumulate(counts)) if c["cumsum"] else list(counts)


@mutation("group_list negative", "group_list")
def _negative(c, d):
    counts = list(c["counts"])
    i = d.draw(st.integers(0, len(counts) - 1))
    delta = d.draw(st.integers(1, 10))
    counts[i] -= counts[i] + delta  # now -delta
    if len(counts) > 1:  # keep the sum right where possible: only the sign is wrong
        j = (i + 1) % len(counts)
        counts[j] += counts[i] * -1 + c["counts"][i]
    values = _counts_to_values(c, counts)
    if c["cumsum"] and values[-1] >= 0:  # cumsum form: a negative offset, not only a negative count
        values[0] = -delta
    _set_values(c, values)


@mutation("group_list decreasing (cumsum)", "group_list")
def _decreasing(c, d):
    values = list(itertools.accumulate(c["counts"]))
    if len(values) == 1:
        values = [values[0] + 1, values[0]]  # also too long for group_type 0
        c["bias"] = None  # whose [E, N] check would fire first
    else:
        i = d.draw(st.integers(0, len(values) - 2))
        values[i] = values[i + 1] + d.draw(st.integers(1, 5))
    c["cumsum"] = True
    _set_values(c, values)


@mutation("group_list sum too large", "group_list")
def _over(c, d):
    counts = list(c["counts"])
    counts[d.draw(st.integers(0, len(counts) - 1))] += d.draw(st.integers(1, 50))
    _set_values(c, _counts_to_values(c, counts))


@mutation("group_list sum too small", "group_list")
def _under(c, d):
    counts = list(c["counts"])
    if c["total"] == 0:
        counts[0] = -1
    else:
        i = d.draw(st.sampled_from([i for i, v in enumerate(counts) if v > 0]))
        counts[i] -= d.draw(st.integers(1, counts[i]))
    _set_values(c, _counts_to_values(c, counts))


@mutation("group_list huge values", "group_list")
def _huge(c, d):
    values = list(c["values"])
    values[d.draw(st.integers(0, len(values) - 1))] = d.draw(st.sampled_from(HUGE))
    if not isinstance(c["group_list"], list):
        values = [max(min(v, 2**63 - 1), -2**63) for v in values]  # what an int64 tensor can hold
    if values == list(c["values"]):
        values[0] = 2**62
    _set_values(c, values)


@mutation("group_list overflowing int64 sum", "group_list")
def _overflow(c, d):
    # Counts whose int64 sum wraps around to the right total: 2^63 + 2^63 + total == total mod 2^64.
    values = [2**62] * 4 + [c["total"]] if not c["cumsum"] else [2**62, 2**63 - 1, c["total"]]
    c["group_list"] = torch.tensor(values, dtype=torch.int64) if not isinstance(c["group_list"], list) else values
    c["bias"] = None  # keep the group count right so the value check is what fires
    if c["group_type"] == 0:
        _resize_weight(c, len(values))


@mutation("group_list too short", "group_list", types=(0,))
def _short(c, d):
    if len(c["counts"]) == 1:
        _set_values(c, [])
        return
    counts = list(c["counts"])
    last = counts.pop()
    counts[-1] += last
    _set_values(c, _counts_to_values(c, counts))


@mutation("group_list too long", "group_list", types=(0,))
def _long(c, d):
    _set_values(c, _counts_to_values(c, list(c["counts"]) + [0] * d.draw(st.integers(1, 3))))


def _resize_weight(c, e):
    w = c["weight"]
    c["weight"] = torch.zeros((e,) + tuple(w.shape[1:]), dtype=w.dtype)
    c["bias"] = None
    c["gemm_fusion"], c["original_weight"] = False, None


# ---- group_type ----------------------------------------------------------------------------------
for _gt in (1, 3, -2, 100, "0", 0.0, True, None, [0]):
    mutation(f"group_type {_gt!r}", "group_type", types=(0, 2, -1))(lambda c, d, gt=_gt: c.update(group_type=gt))


# ---- x, weight, bias -----------------------------------------------------------------------------
mutation("x not a tensor", "x", types=(0, 2, -1))(lambda c, d: c.update(x=c["x"].tolist()))
mutation("x None", "x", types=(0, 2, -1))(lambda c, d: c.update(x=None))
mutation("x float64", "x", types=(0, 2, -1))(lambda c, d: c.update(x=c["x"].double(), weight=c["weight"].double()))
mutation("x int32", "x", types=(0, 2, -1))(lambda c, d: c.update(x=c["x"].to(torch.int32)))
mutation("x 3-D", "x", types=(0, 2, -1))(lambda c, d: c.update(x=c["x"].unsqueeze(0)))
mutation("x 1-D", "x", types=(0, 2, -1))(lambda c, d: c.update(x=c["x"].reshape(-1)))
mutation("x inner size wrong", "x", types=(0, -1))(
    lambda c, d: c.update(x=torch.zeros(c["x"].shape[0], c["x"].shape[1] + 1, dtype=c["x"].dtype)))
mutation("x grouped size wrong", "x", types=(2,))(
    lambda c, d: c.update(x=torch.zeros(c["x"].shape[0], c["x"].shape[1] + 1, dtype=c["x"].dtype)))
mutation("weight not a tensor", "weight", types=(0, 2, -1))(lambda c, d: c.update(weight=3.0))
mutation("weight other dtype", "weight", types=(0, 2, -1))(
    lambda c, d: c.update(weight=c["weight"].to(torch.float16 if c["x"].dtype != torch.float16 else torch.bfloat16)))
mutation("weight int8", "weight", types=(0, 2, -1))(lambda c, d: c.update(weight=c["weight"].to(torch.int8)))
mutation("weight dims", "weight", types=(0, 2, -1))(lambda c, d: c.update(weight=c["weight"].unsqueeze(0)))
mutation("weight on another device", "weight", types=(0, 2, -1), exc=(RuntimeError,))(
    lambda c, d: c.update(weight=c["weight"].to("meta")))
mutation("bias wrong dtype", "bias", types=(0, 2, -1))(
    lambda c, d: c.update(bias=torch.zeros(_bias_shape(c), dtype=torch.float64)))
mutation("bias wrong shape", "bias", types=(0, 2, -1))(
    lambda c, d: c.update(bias=torch.zeros(_bias_shape(c)[:-1] + (_bias_shape(c)[-1] + 1,),
                                           dtype=bias_dtype(c["x"].dtype))))
mutation("bias not a tensor", "bias", types=(0, 2, -1))(lambda c, d: c.update(bias=[0.0]))


def _bias_shape(c):
    n = c["weight"].shape[-1]
    return (n,) if c["group_type"] == -1 else (len(c["counts"]), n)


# ---- gemm_fusion / original_weight / main_grad ---------------------------------------------------
for _v in (1, 0, "yes", None, 1.0):
    mutation(f"gemm_fusion {_v!r}", "gemm_fusion", types=(0, 2, -1))(lambda c, d, v=_v: c.update(gemm_fusion=v))
mutation("gemm_fusion without original_weight", "original_weight", types=(0,))(
    lambda c, d: c.update(gemm_fusion=True, original_weight=None))
mutation("gemm_fusion with group_type 2", "gemm_fusion", types=(2,))(
    lambda c, d: c.update(gemm_fusion=True, original_weight=_param(c)))
mutation("original_weight not a tensor", "original_weight", types=(0,))(
    lambda c, d: c.update(gemm_fusion=True, original_weight="weight"))
mutation("original_weight without main_grad", "main_grad", types=(0,))(
    lambda c, d: c.update(gemm_fusion=True, original_weight=_param(c, main_grad=None)))
mutation("main_grad too small", "main_grad", types=(0,))(
    lambda c, d: c.update(gemm_fusion=True, original_weight=_param(
        c, main_grad=torch.zeros(c["weight"].numel() - 1))))
mutation("main_grad not a tensor", "main_grad", types=(0,))(
    lambda c, d: c.update(gemm_fusion=True, original_weight=_param(c, main_grad=[0.0])))
@mutation("main_grad not contiguous", "main_grad", types=(0,))
def _main_grad_strided(c, d):
    e, k, n = c["weight"].shape
    c.update(weight=torch.zeros(e, k, n + 1, dtype=c["x"].dtype), bias=None)  # >= 2 elements
    c.update(gemm_fusion=True, original_weight=_param(c, main_grad=torch.zeros(e, k, 2 * (n + 1))[..., ::2]))
mutation("weight not a view of original_weight", "original_weight", types=(0,))(
    lambda c, d: c.update(gemm_fusion=True, original_weight=_param(c, detached=True)))


def _param(c, main_grad="zeros", detached=False):
    p = torch.nn.Parameter(c["weight"].detach().clone())
    if main_grad == "zeros":
        p.main_grad = torch.zeros(p.shape)
    elif main_grad is not None:
        p.main_grad = main_grad
    if not detached:
        c["weight"] = p  # weight is original_weight itself: a valid view
    return p


# ---- the property --------------------------------------------------------------------------------
@st.composite
def valid_call(draw, group_types):
    group_type = draw(st.sampled_from(group_types))
    dtype = draw(st.sampled_from(DTYPES))
    counts = draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    e, total = len(counts), sum(counts)
    k, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    cumsum = draw(st.booleans())
    values = list(itertools.accumulate(counts)) if cumsum else list(counts)
    as_list = draw(st.booleans())
    if group_type == 0:
        x, w = randn((total, k), dtype, gen), randn((e, k, n), dtype, gen)
    elif group_type == 2:
        x, w = randn((k, total), dtype, gen), randn((total, n), dtype, gen)
    else:
        x, w = randn((total, k), dtype, gen), randn((k, n), dtype, gen)
    c = dict(group_type=group_type, counts=counts, total=total, cumsum=cumsum, values=values, x=x, weight=w,
             group_list=None if group_type == -1 else (values if as_list else torch.tensor(values)),
             bias=None, gemm_fusion=False, original_weight=None)
    if draw(st.booleans()):
        c["bias"] = randn(_bias_shape(c), bias_dtype(dtype), gen)
    if group_type == 0 and draw(st.booleans()):
        c["original_weight"], c["gemm_fusion"] = _param(c), True
    return c


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", sorted(MUTATIONS))
@robust_settings(6)
@given(data=st.data())
def test_invalid_argument_raises_naming_it(backend, name, data):
    """Every mutation, on varied valid calls of the group types it applies to."""
    count("cases_generated")
    types, arg, exc, mutate = MUTATIONS[name]
    c = data.draw(valid_call(types), label="valid call")
    mutate(c, data)
    api = npu_gmm if c["cumsum"] else npu_gmm_v2
    snapshot = [t.clone() for t in _tensors(c)]
    count("invalid_inputs")
    count(f"invalid inputs: {arg}")
    try:
        with using_backend(backend):
            api(c["x"], c["weight"], bias=c["bias"], group_list=c["group_list"], group_type=c["group_type"],
                gemm_fusion=c["gemm_fusion"], original_weight=c["original_weight"])
    except exc as e:
        expect(names_argument(str(e), arg), f"{name}: the message does not name {arg!r}: {e}")
    except Exception as e:  # any other exception type is a crash
        count("crashes")
        raise AssertionError(f"{name}: {type(e).__name__} instead of {exc}: {e}") from e
    else:
        count("wrong_results")
        raise AssertionError(f"{name}: accepted")
    expect(all(torch.equal(a, b) for a, b in zip(snapshot, _tensors(c))), f"{name}: an input was modified")


def _tensors(c):
    out = [t for t in (c["x"], c["weight"], c["bias"], c["group_list"], getattr(c["original_weight"], "main_grad", None))
           if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    return [t.detach() for t in out]
