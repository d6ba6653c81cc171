"""Every documented constraint: the error type, and a message that names the argument and the rule."""
from __future__ import annotations

import pytest
import torch

import gmm_plugin
from gmm_plugin.ops import gmm


def xw(m=8, k=4, n=4, e=2, dtype=torch.float32):
    return torch.randn(m, k, dtype=dtype), torch.randn(e, k, n, dtype=dtype)


CASES = [
    # (description, callable, exception, words that must appear in the message)
    ("x not a tensor", lambda: gmm.npu_gmm([[1.0]], xw()[1], group_list=[4, 8]), TypeError, ["x", "torch.Tensor"]),
    ("weight not a tensor", lambda: gmm.npu_gmm(xw()[0], 3, group_list=[4, 8]), TypeError, ["weight", "torch.Tensor"]),
    ("bias not a tensor", lambda: gmm.npu_gmm(*xw(), bias=[1], group_list=[4, 8]), TypeError, ["bias"]),
    ("group_type 1", lambda: gmm.npu_gmm(*xw(), group_list=[4, 8], group_type=1), ValueError, ["group_type 1", "not supported"]),
    ("group_type 3", lambda: gmm.npu_gmm(*xw(), group_list=[4, 8], group_type=3), ValueError, ["group_type", "-1, 0 or 2"]),
    ("group_type str", lambda: gmm.npu_gmm(*xw(), group_list=[4, 8], group_type="0"), TypeError, ["group_type", "int"]),
    ("x int dtype", lambda: gmm.npu_gmm(torch.ones(8, 4, dtype=torch.int32), xw()[1], group_list=[4, 8]),
     TypeError, ["x dtype", "float16, bfloat16 or float32"]),
    ("weight float64", lambda: gmm.npu_gmm(xw()[0], xw()[1].double(), group_list=[4, 8]), TypeError, ["weight dtype"]),
    ("x/weight dtypes differ", lambda: gmm.npu_gmm(xw()[0], xw()[1].bfloat16(), group_list=[4, 8]),
     TypeError, ["x and weight", "same dtype"]),
    ("bias dtype for bf16", lambda: gmm.npu_gmm(*xw(dtype=torch.bfloat16), bias=torch.zeros(2, 4, dtype=torch.bfloat16),
                                                group_list=[4, 8]), TypeError, ["bias dtype", "float32"]),
    ("bias shape", lambda: gmm.npu_gmm(*xw(), bias=torch.zeros(3, 4), group_list=[4, 8]), ValueError, ["bias", "[2, 4]"]),
    ("x 3-D for type 0", lambda: gmm.npu_gmm(torch.randn(2, 8, 4), xw()[1], group_list=[4, 8]), ValueError, ["x", "2-D"]),
    ("weight 2-D for type 0", lambda: gmm.npu_gmm(xw()[0], torch.randn(4, 4), group_list=[4, 8]), ValueError, ["weight", "3-D"]),
    ("K mismatch", lambda: gmm.npu_gmm(torch.randn(8, 5), xw()[1], group_list=[4, 8]), ValueError, ["weight.shape[1]", "x.shape[1]"]),
    ("groups vs experts", lambda: gmm.npu_gmm(*xw(), group_list=[2, 4, 8]), ValueError, ["3 groups", "2 experts"]),
    ("weight 3-D for type 2", lambda: gmm.npu_gmm(torch.randn(4, 8), torch.randn(2, 8, 4), group_list=[4, 8], group_type=2),
     ValueError, ["weight", "2-D"]),
    ("M mismatch type 2", lambda: gmm.npu_gmm(torch.randn(4, 8), torch.randn(7, 4), group_list=[4, 8], group_type=2),
     ValueError, ["weight.shape[0]", "x.shape[1]"]),
    ("group_list missing", lambda: gmm.npu_gmm(*xw()), ValueError, ["group_list", "required"]),
    ("group_list with type -1", lambda: gmm.npu_gmm(torch.randn(8, 4), torch.randn(4, 4), group_list=[8], group_type=-1),
     ValueError, ["group_list", "None", "-1"]),
    ("group_list 2-D", lambda: gmm.npu_gmm(*xw(), group_list=torch.tensor([[4, 8]])), ValueError, ["group_list", "one-dimensional"]),
    ("group_list int32", lambda: gmm.npu_gmm(*xw(), group_list=torch.tensor([4, 8], dtype=torch.int32)),
     TypeError, ["group_list", "int64", "torch.int32"]),
    ("group_list float list", lambda: gmm.npu_gmm(*xw(), group_list=[4.0, 8.0]), TypeError, ["group_list", "int"]),
    ("group_list bool list", lambda: gmm.npu_gmm(*xw(), group_list=[True, 8]), TypeError, ["group_list"]),
    ("group_list str", lambda: gmm.npu_gmm(*xw(), group_list="4,8"), TypeError, ["group_list", "str"]),
    ("group_list empty", lambda: gmm.npu_gmm(torch.randn(0, 4), torch.randn(0, 4, 4), group_list=[]), ValueError, ["group_list", "at least one"]),
    ("cumsum negative", lambda: gmm.npu_gmm(*xw(), group_list=[-1, 8]), ValueError, ["group_list", "non-negative", "-1"]),
    ("cumsum decreasing", lambda: gmm.npu_gmm(*xw(e=3), group_list=[5, 4, 8]), ValueError, ["non-decreasing", "group_list[1]"]),
    ("cumsum short", lambda: gmm.npu_gmm(*xw(), group_list=[4, 7]), ValueError, ["last value", "x.shape[0]", "8", "7"]),
    ("cumsum long", lambda: gmm.npu_gmm(*xw(), group_list=[4, 9]), ValueError, ["last value", "9"]),
    ("counts negative", lambda: gmm.npu_gmm_v2(*xw(), group_list=torch.tensor([-2, 10])), ValueError, ["non-negative", "-2"]),
    ("counts short", lambda: gmm.npu_gmm_v2(*xw(), group_list=torch.tensor([4, 3])), ValueError, ["sum of group_list", "8", "7"]),
    ("counts long", lambda: gmm.npu_gmm_v2(*xw(), group_list=[4, 5]), ValueError, ["sum of group_list", "9"]),
    ("counts overflow", lambda: gmm.npu_gmm_v2(*xw(), group_list=[2**62, 2**62, ]), ValueError, ["sum of group_list"]),
    ("counts type 2 sum", lambda: gmm.npu_gmm_v2(torch.randn(4, 8), torch.randn(8, 4), group_list=[3, 4], group_type=2),
     ValueError, ["sum of group_list", "x.shape[1]"]),
    ("gemm_fusion without original_weight", lambda: gmm.npu_gmm(*xw(), group_list=[4, 8], gemm_fusion=True),
     ValueError, ["gemm_fusion", "original_weight"]),
    ("gemm_fusion not bool", lambda: gmm.npu_gmm(*xw(), group_list=[4, 8], gemm_fusion=1), TypeError, ["gemm_fusion", "bool"]),
    ("original_weight not tensor", lambda: gmm.npu_gmm(*xw(), group_list=[4, 8], original_weight=3), TypeError, ["original_weight"]),
]


@pytest.mark.parametrize("desc,fn,exc,words", CASES, ids=[c[0] for c in CASES])
def test_constraint_errors(desc, fn, exc, words):
    with pytest.raises(exc) as info:
        fn()
    for word in words:
        assert word in str(info.value), f"{desc}: {word!r} not in {str(info.value)!r}"


def test_device_mismatch_has_mindspeeds_message():
    x, w = xw()
    meta_w = torch.empty(w.shape, device="meta")
    with pytest.raises(RuntimeError, match=r"Expected all tensors to be on the same device.*\(arg0\).*\(weight\)"):
        gmm.npu_gmm(x, meta_w, group_list=[4, 8])
    with pytest.raises(RuntimeError, match=r"\(group_list\)"):
        gmm.npu_gmm(x, w, group_list=torch.tensor([4, 8], device="meta"))


def test_errors_leave_inputs_untouched():
    x, w = xw()
    x0, w0 = x.clone(), w.clone()
    with pytest.raises(ValueError):
        gmm.npu_gmm(x, w, group_list=[4, 7])
    assert torch.equal(x, x0) and torch.equal(w, w0)


def test_backend_env_var_and_bad_names(monkeypatch):
    x, w = xw()
    from gmm_plugin import settings
    before = settings.configure()
    try:
        monkeypatch.setenv("GMM_PLUGIN_BACKEND", "nonsense")
        settings.reset()  # the environment is read on first use after a reset
        with pytest.raises(ValueError, match="environment variable GMM_PLUGIN_BACKEND: key 'backend' must be one of"):
            gmm.npu_gmm(x, w, group_list=[4, 8])
        monkeypatch.setenv("GMM_PLUGIN_BACKEND", "reference")
        settings.reset()
        assert settings.current().backend == "reference"
    finally:
        settings.configure(before)
    with pytest.raises(ValueError, match="backend must be one of"):
        gmm_plugin.set_backend("cutlass")
