"""The aclnn backend's binding against the CANN double (tests/cann_double), and the double's rules.

The double is called directly with CANN's signatures (reference §1-2) to show each host-side rule
it enforces can fail; then the real binding (gmm_plugin/csrc/aclnn_gmm.cpp) is driven through it:
CANN's error text in the Python exception, no object left alive, and the fallbacks when a CANN
exports only some ops (doubles built without V5, AddV2, Add). The whole op suite runs through the
binding on the full double as the `aclnn` variant (tests/conftest.py); nothing here ran on Ascend
hardware.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from ctypes import POINTER, c_char_p, c_int, c_int64, c_uint64, c_void_p

import pytest
import torch

import cann_double
from gmm_plugin.backends import aclnn
from gmm_plugin.group_list import Groups
from gmm_plugin.ops import gmm
from reference import gmm_reference, tolerance
from sync_counter import count_host_reads

pytestmark = pytest.mark.skipif(cann_double.CC is None, reason="no C compiler to build the CANN double")
PARAM_NULLPTR, PARAM_INVALID, INNER = 161001, 161002, 561000
ND, NCL = 2, 47
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 27, torch.int64: 9, torch.int32: 3}


# ---- the double, called directly ----------------------------------------------------------------

class Abi:
    """The double's exports with CANN's signatures, and tensors described as op-plugin does."""

    def __init__(self, path):
        self.path, lib = path, ctypes.CDLL(path)
        i64p = POINTER(c_int64)
        lib.aclCreateTensor.restype = c_void_p
        lib.aclCreateTensor.argtypes = [i64p, c_uint64, c_int, i64p, c_int64, c_int, i64p, c_uint64, c_void_p]
        lib.aclCreateTensorList.restype = c_void_p
        lib.aclCreateTensorList.argtypes = [POINTER(c_void_p), c_uint64]
        for name in ("aclDestroyTensor", "aclDestroyTensorList"):
            getattr(lib, name).argtypes = [c_void_p]
        lib.aclGetRecentErrMsg.restype = c_char_p
        lib.aclnnGroupedMatmulV4GetWorkspaceSize.argtypes = [c_void_p] * 12 + [c_int64] * 4 + [c_void_p] * 5
        lib.aclnnGroupedMatmulV4.argtypes = [c_void_p, c_uint64, c_void_p, c_void_p]
        self.lib, self.keep = lib, []

    def tensor(self, t, *, fmt=None, storage=None, dims=None):
        dims = t.shape if dims is None else dims
        arr = lambda v: (c_int64 * max(len(v), 1))(*v)  # noqa: E731
        st = t.untyped_storage()
        storage = st.nbytes() // t.element_size() if storage is None else storage
        fmt = (NCL if len(dims) == 3 else ND) if fmt is None else fmt
        self.keep.append(t)
        return self.lib.aclCreateTensor(arr(dims), len(dims), DTYPES[t.dtype], arr(t.stride()), t.storage_offset(),
                                        fmt, arr([storage]), 1, st.data_ptr())

    def listed(self, *tensors):
        return self.lib.aclCreateTensorList((c_void_p * len(tensors))(*tensors), len(tensors))

    def gmm_v4(self, x, w, gl, y, *, split_item=3, group_type=0, gl_type=1, act_type=0, executor=True):
        ws, ex = c_uint64(0), c_void_p()
        status = self.lib.aclnnGroupedMatmulV4GetWorkspaceSize(
            x, w, *[None] * 6, gl, None, None, None, split_item, group_type, gl_type, act_type, y, None, None,
            ctypes.byref(ws), ctypes.byref(ex) if executor else None)
        return status, ws.value, ex

    def error(self) -> str:
        text = self.lib.aclGetRecentErrMsg()
        return text.decode() if text else ""

    def live(self):
        return cann_double.live(self.path)


@pytest.fixture
def abi():
    # A build of its own (RULE_TESTS names it; the source has no such switch): these tests break
    # the rules on purpose, which the summary's violation count of that build then shows.
    a = Abi(cann_double.library("CANN_DOUBLE_NO_V5", cann_double.RULE_TESTS))
    yield a
    assert {k: v for k, v in a.live().items() if k != "violations"} == dict.fromkeys(cann_double.KINDS[:4], 0)


def split_m_case(abi, m=6, k=4, n=3, counts=(2, 0, 4), w=None):
    x, w = torch.randn(m, k), torch.randn(len(counts), k, n) if w is None else w
    gl, y = torch.tensor(counts), torch.empty(m, n)
    xt, wt, glt, yt = abi.tensor(x), abi.tensor(w), abi.tensor(gl), abi.tensor(y)
    return (x, w, gl, y), (abi.listed(xt), abi.listed(wt), glt, abi.listed(yt))


def destroy(abi, xl, wl, glt, yl):
    for lst in (xl, wl, yl):
        assert abi.lib.aclDestroyTensorList(lst) == 0
    assert abi.lib.aclDestroyTensor(glt) == 0


def test_objects_and_list_ownership(abi):
    before = abi.live()
    t = abi.tensor(torch.zeros(2, 3))
    assert abi.live()["aclTensor"] == before["aclTensor"] + 1
    assert abi.lib.aclCreateTensor(None, 2, 0, None, 0, ND, None, 0, None) is None  # NULL dims, count > 0
    lst = abi.listed(t)
    assert abi.lib.aclDestroyTensor(t) == PARAM_INVALID and "belongs to a list" in abi.error()
    assert abi.listed(t) is None  # a tensor has one owner
    assert abi.lib.aclDestroyTensorList(lst) == 0  # destroys its tensor too
    assert abi.lib.aclDestroyTensorList(lst) == PARAM_INVALID and "destroyed already" in abi.error()
    assert abi.lib.aclDestroyTensor(None) == 0 and abi.lib.aclDestroyTensorList(None) == 0
    after = abi.live()
    assert after["aclTensor"] == before["aclTensor"] and after["aclTensorList"] == before["aclTensorList"]
    assert after["violations"] == before["violations"] + 3


@pytest.mark.parametrize("change, status, text", [
    (dict(group_type=1), PARAM_INVALID, "groupType 1 is not supported"),
    (dict(gl_type=2), PARAM_INVALID, "groupListType 2"),
    (dict(split_item=0), PARAM_INVALID, "splitItem 0"),
    (dict(executor=False), PARAM_NULLPTR, "executor must not be NULL"),
    (dict(weight_format=ND), PARAM_INVALID, "weight has format 2; a 3-D tensor is 47"),
    (dict(weight_storage=10), PARAM_INVALID, "weight's view (offset 0, last element 35) exceeds its storage of 10"),
    (dict(gl_dtype=torch.int32), PARAM_INVALID, "groupList has dtype 3"),
])
def test_split_m_rules(abi, change, status, text):
    (x, w, gl, y), (xl, wl, glt, yl) = split_m_case(abi)
    if "weight_format" in change or "weight_storage" in change:
        abi.lib.aclDestroyTensorList(wl)
        fmt, storage = change.pop("weight_format", None), change.pop("weight_storage", None)
        wl = abi.listed(abi.tensor(w, fmt=fmt, storage=storage))
    if "gl_dtype" in change:
        abi.lib.aclDestroyTensor(glt)
        glt = abi.tensor(gl.to(change.pop("gl_dtype")))
    got, _, ex = abi.gmm_v4(xl, wl, glt, yl, **change)
    assert got == status and text in abi.error()
    assert not ex
    destroy(abi, xl, wl, glt, yl)


def test_split_k_wants_x_transposed_by_strides(abi):
    w, gl, y = torch.randn(6, 3), torch.tensor([2, 4]), torch.empty(2, 4, 3)
    for x, status in ((torch.randn(4, 6), PARAM_INVALID), (torch.randn(6, 4).t(), 0)):
        xl, wl, yl = (abi.listed(abi.tensor(t)) for t in (x, w, y))
        glt = abi.tensor(gl)
        got, ws, ex = abi.gmm_v4(xl, wl, glt, yl, group_type=2)
        assert got == status, abi.error()
        if status:
            assert "groupType 2 needs x as a transposed view" in abi.error()
        else:
            buf = torch.empty(ws, dtype=torch.uint8)
            assert abi.lib.aclnnGroupedMatmulV4(buf.data_ptr(), ws, ex, None) == 0
            assert torch.allclose(y, gmm_reference(x, w, [2, 4], group_type=2).float(), atol=1e-5)
        destroy(abi, xl, wl, glt, yl)


def test_group_list_limits(abi):
    # 1025 groups (K = N = 1): the tensor group_list takes at most 1024 entries.
    (x, w, gl, y), (xl, wl, glt, yl) = split_m_case(abi, m=4, k=1, n=1, counts=[0] * 1021 + [1] * 4)
    status, _, _ = abi.gmm_v4(xl, wl, glt, yl)
    assert status == PARAM_INVALID and "1025 entries; 1 to 1024" in abi.error()
    destroy(abi, xl, wl, glt, yl)
    # The inner axis (K of x) must stay below 65536: shapes only, phase 1 reads no data.
    one = torch.zeros(1)
    xl = abi.listed(abi.tensor(one.expand(2, 65536), dims=[2, 65536]))
    wl = abi.listed(abi.tensor(one.expand(2, 65536, 1), dims=[2, 65536, 1]))
    glt, yl = abi.tensor(torch.tensor([1, 1])), abi.listed(abi.tensor(torch.zeros(2, 1)))
    status, _, _ = abi.gmm_v4(xl, wl, glt, yl)
    assert status == PARAM_INVALID and "inner axis" in abi.error()
    destroy(abi, xl, wl, glt, yl)


def test_workspace_and_single_use_executor(abi):
    (x, w, gl, y), (xl, wl, glt, yl) = split_m_case(abi)
    status, ws, ex = abi.gmm_v4(xl, wl, glt, yl)
    assert status == 0 and ws > 0
    run = abi.lib.aclnnGroupedMatmulV4
    assert run(None, ws, ex, None) == PARAM_NULLPTR and "workspace is NULL" in abi.error()
    buf = torch.empty(ws, dtype=torch.uint8)
    assert run(buf.data_ptr(), ws - 1, ex, None) == PARAM_INVALID and "below the" in abi.error()
    assert run(buf.data_ptr(), ws, ex, None) == 0
    assert torch.allclose(y, gmm_reference(x, w, [2, 0, 4]).float(), atol=1e-5)
    assert run(buf.data_ptr(), ws, ex, None) == PARAM_INVALID and "single use" in abi.error()
    assert run(None, 0, None, None) == PARAM_NULLPTR
    destroy(abi, xl, wl, glt, yl)


def test_group_list_values_are_read_in_the_run(abi):
    # Host-side code checks the group_list's shape and dtype only; its values live on the device.
    (x, w, gl, y), (xl, wl, glt, yl) = split_m_case(abi, counts=(5, -1, 2))
    status, ws, ex = abi.gmm_v4(xl, wl, glt, yl)
    assert status == 0
    buf = torch.empty(ws, dtype=torch.uint8)
    assert abi.lib.aclnnGroupedMatmulV4(buf.data_ptr(), ws, ex, None) == INNER and "undocumented" in abi.error()
    destroy(abi, xl, wl, glt, yl)


# ---- the binding through the double ---------------------------------------------------------------

def test_cann_error_text_reaches_python():
    with cann_double.selected(cann_double.library()) as path:
        b = aclnn.binding()
        assert b.is_double and b.exports == {"V5", "V4", "AddV2", "Add", "ErrMsg"}
        x, w, gl = torch.randn(6, 4), torch.randn(3, 4, 2), torch.tensor([2, 0, 4])
        with pytest.raises(RuntimeError, match=r"aclnnGroupedMatmulV5GetWorkspaceSize returned 161002: "
                                               r"aclnnGroupedMatmulV5: groupType 1 is not supported"):
            b.grouped_matmul(x, w, gl, 1, 1)
        with pytest.raises(RuntimeError, match=r"aclnnGroupedMatmulV5 returned 561000: .*groupList entry 1 \(-1\)"):
            b.grouped_matmul(x, w, torch.tensor([5, -1, 2]), 0, 1)
        with pytest.raises(TypeError, match="^x must be float16, bfloat16 or float32 for the aclnn backend, got "
                                            "torch.float64"):
            b.grouped_matmul(x.double(), w, gl, 0, 1)
        y = b.grouped_matmul(x, w, torch.tensor([2, 2, 6]), 0, 0)  # cumulative sums as given
        assert torch.allclose(y, gmm_reference(x, w, [2, 0, 4]).float(), atol=1e-5)
        assert cann_double.count(path, "aclnnGroupedMatmulV5") >= 1
    # selected() checked that every aclTensor, list and executor was destroyed, errors included


def megatron_param(shape, dtype):
    p = torch.nn.Parameter(torch.randn(*shape, dtype=dtype))
    p.main_grad = torch.zeros(shape, dtype=torch.float32)
    p.grad_added_to_main_grad = False
    return p


# build flags -> (the GMM op that runs, the fusion op that runs, or None: per-expert products)
FALLBACKS = {
    (): ("aclnnGroupedMatmulV5", "aclnnGroupedMatmulAddV2"),
    ("CANN_DOUBLE_NO_V5",): ("aclnnGroupedMatmulV4", "aclnnGroupedMatmulAddV2"),
    ("CANN_DOUBLE_NO_ADDV2",): ("aclnnGroupedMatmulV5", "aclnnGroupedMatmulAdd"),
    ("CANN_DOUBLE_NO_ADD", "CANN_DOUBLE_NO_ADDV2"): ("aclnnGroupedMatmulV5", None),
}
OPS = ("aclnnGroupedMatmulV4", "aclnnGroupedMatmulV5", "aclnnGroupedMatmulAdd", "aclnnGroupedMatmulAddV2")


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("flags", list(FALLBACKS), ids=lambda f: "-".join(s[12:].lower() for s in f) or "full")
def test_fallbacks(flags, api):
    """Forward, dX and the fused weight gradient into fp32 main_grad, with the ops each CANN exports.
    x is a row slice (storage offset), the weight a transposed view: the base + offset conversion."""
    gmm_op, add_op = FALLBACKS[flags]
    counts = [3, 0, 7]
    path = cann_double.library(*flags)
    runs = {op: cann_double.count(path, op) for op in OPS}
    with cann_double.selected(path), __import__("gmm_plugin").settings(backend="aclnn"):
        big = torch.randn(14, 8, dtype=torch.bfloat16, requires_grad=True)
        p = megatron_param((3, 6, 8), torch.bfloat16)  # stored [E, N, K], used transposed
        group_list = torch.tensor(counts if api == "v2" else [3, 3, 10])
        fn = gmm.npu_gmm_v2 if api == "v2" else gmm.npu_gmm
        y = fn(big[2:12], p.transpose(-1, -2), group_list=group_list, gemm_fusion=True, original_weight=p)
        g = torch.randn_like(y)
        y.backward(g)
    ref_w = p.detach().transpose(-1, -2).double().requires_grad_(True)
    ref_x = big.detach()[2:12].double().requires_grad_(True)
    ref_y = gmm_reference(ref_x, ref_w, counts)
    ref_y.backward(g.double())
    assert (y.double() - ref_y).abs().max() <= tolerance(torch.bfloat16, 8, ref_y.abs().max().item())
    gx = big.grad[2:12].double()
    assert (gx - ref_x.grad).abs().max() <= tolerance(torch.bfloat16, 6, ref_x.grad.abs().max().item())
    want = ref_w.grad.transpose(-1, -2)
    assert (p.main_grad.double() - want).abs().max() <= tolerance(torch.float32, 10, want.abs().max().item()) * 8
    ran = {op for op in OPS if cann_double.count(path, op) > runs[op]}
    assert ran == {gmm_op} | ({add_op} if add_op else set())


def test_without_any_grouped_matmul_the_binding_says_what_is_missing():
    path = cann_double.library("CANN_DOUBLE_NO_V4", "CANN_DOUBLE_NO_V5")
    with cann_double.selected(path):
        with pytest.raises(ImportError, match=r"missing symbols: aclnnGroupedMatmulV5/V4"):
            aclnn.binding()


def test_library_path_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(aclnn.CANN_LIB_ENV, str(tmp_path))
    with pytest.raises(ImportError, match="no CANN library"):
        aclnn.library_paths()
    monkeypatch.delenv(aclnn.CANN_LIB_ENV)
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path))
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libopapi_transformer.so").touch()
    paths = aclnn.library_paths()
    assert paths[0] == "libcust_opapi.so" and paths[1] == str(tmp_path / "lib64" / "libopapi_transformer.so")
    assert not aclnn.AclnnBackend().supports(torch.device("cpu"))  # no double selected: no CPU tensors


def test_build_prints_one_line_and_names_a_missing_compiler(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(aclnn.BUILD_DIR_ENV, str(tmp_path))
    try:
        aclnn._compiled.cache_clear()
        aclnn._compiled()
        aclnn._compiled.cache_clear()
        aclnn._compiled()  # cached in the build dir: no second build
        assert capfd.readouterr().err.count("building the aclnn binding") == 1
        aclnn._compiled.cache_clear()
        monkeypatch.setenv("CXX", "no-such-c++-compiler")
        with pytest.raises(ImportError, match="needs a C\\+\\+ compiler: 'no-such-c\\+\\+-compiler'"):
            aclnn._compiled()
    finally:
        aclnn._compiled.cache_clear()


def test_more_than_1024_groups_go_in_several_calls():
    """The 1024-group limit is the npu backend's code, shared: two V5 calls, each within the limit."""
    counts = [1] * 1100
    path = cann_double.library()
    with cann_double.selected(path), __import__("gmm_plugin").settings(backend="aclnn"):
        runs = cann_double.count(path, "aclnnGroupedMatmulV5")
        x, w = torch.randn(1100, 2), torch.randn(1100, 2, 3)
        y = gmm.npu_gmm_v2(x, w, group_list=torch.tensor(counts))
        assert cann_double.count(path, "aclnnGroupedMatmulV5") - runs == 2
    ref = gmm_reference(x, w, counts)
    assert (y.double() - ref).abs().max() <= tolerance(torch.float32, 2, ref.abs().max().item())


@pytest.mark.parametrize("flags, reads", [((), 0), (("CANN_DOUBLE_NO_ADD", "CANN_DOUBLE_NO_ADDV2"), 1)],
                         ids=["full", "no_add"])
def test_device_only_group_list_is_never_read_back_by_the_kernels(flags, reads):
    """The binding hands the device group_list to the kernels; only the per-expert fusion (no Add op
    exported) needs group bounds on the host: one read (Groups.segments)."""
    counts = torch.tensor([4, 0, 9, 3], device="cpu")  # a device named: device data for the counter
    x = torch.randn(16, 8, device="cpu", dtype=torch.bfloat16)
    w = torch.randn(4, 8, 6, device="cpu", dtype=torch.bfloat16)
    b = torch.randn(16, 6, device="cpu", dtype=torch.bfloat16)
    out = torch.zeros(4, 8, 6, device="cpu")
    backend = aclnn.AclnnBackend()
    with cann_double.selected(cann_double.library(*flags)):
        groups = Groups(False, counts, 16)
        with count_host_reads(fallback_ops=(torch._assert_async,)) as seen:
            y = backend.grouped_mm(x, w, groups)
            dw = backend.grouped_mm_k(x.t(), b, groups)
            backend.accumulate_k(out, x.t(), b, groups, wgrad_dtype="fp32")
    assert seen.total == reads, seen.report()
    want = gmm_reference(x.t(), b, [4, 0, 9, 3], group_type=2)
    ref_y = gmm_reference(x, w, [4, 0, 9, 3])
    assert (y.double() - ref_y).abs().max() <= tolerance(torch.bfloat16, 8, ref_y.abs().max().item())
    assert (dw.double() - want).abs().max() <= tolerance(torch.bfloat16, 9, want.abs().max().item())
    assert (out.double() - want).abs().max() <= tolerance(torch.float32, 9, want.abs().max().item())


# ---- what the binding refuses or cleans up ----------------------------------------------------------

def set_workspace(path, nbytes):
    fn = ctypes.CDLL(path).cann_double_set_workspace
    fn.argtypes = [c_uint64]
    fn(nbytes)


def test_a_failed_workspace_allocation_destroys_the_executor():
    """Phase 1 made an executor that no run will delete: the binding destroys it (aclDestroyAclOpExecutor)."""
    path = cann_double.library()
    with cann_double.selected(path):
        set_workspace(path, 1 << 62)  # no allocator gives 4 EiB: torch.empty raises, the binding reports it
        try:
            x, w, gl = torch.randn(6, 4), torch.randn(3, 4, 2), torch.tensor([2, 0, 4])
            with pytest.raises(RuntimeError, match=r"aclnnGroupedMatmulV5: allocating its workspace of "
                                                   r"4611686018427387904 bytes failed$"):
                aclnn.binding().grouped_matmul(x, w, gl, 0, 1)
            assert cann_double.live(path)["aclOpExecutor"] == 0
            with pytest.raises(RuntimeError, match=r"aclnnGroupedMatmulAddV2: allocating its workspace"):
                aclnn.binding().grouped_matmul_add(torch.zeros(3, 4, 2), x.bfloat16(), torch.randn(6, 2).bfloat16(),
                                                   gl, 1)
        finally:
            set_workspace(path, 4096)
    # selected() checked that no executor, tensor or list is left alive


def test_the_doubles_executor_destroy(abi):
    (x, w, gl, y), (xl, wl, glt, yl) = split_m_case(abi)
    lib = abi.lib
    lib.aclDestroyAclOpExecutor.argtypes = [c_void_p]
    status, ws, ex = abi.gmm_v4(xl, wl, glt, yl)
    before = abi.live()
    assert status == 0 and lib.aclDestroyAclOpExecutor(ex) == 0
    assert abi.live()["aclOpExecutor"] == before["aclOpExecutor"] - 1
    assert lib.aclDestroyAclOpExecutor(ex) == PARAM_INVALID and "destroyed already" in abi.error()
    assert lib.aclDestroyAclOpExecutor(None) == 561103
    destroy(abi, xl, wl, glt, yl)


def test_group_list_dtype_is_named():
    with cann_double.selected(cann_double.library()):
        b = aclnn.binding()
        x, w, gl = torch.randn(6, 4), torch.randn(3, 4, 2), torch.tensor([2, 0, 4], dtype=torch.int32)
        msg = r"^group_list must be int64 for the aclnn backend \(aclnnGroupedMatmul's groupListOptional is INT64\), " \
              r"got torch.int32\.$"
        with pytest.raises(TypeError, match=msg):
            b.grouped_matmul(x, w, gl, 0, 1)
        with pytest.raises(TypeError, match=msg):
            b.grouped_matmul_add(torch.zeros(3, 4, 2), x.t().bfloat16(), torch.randn(6, 2).bfloat16(), gl, 1)
        # through the backend, from a device group_list in int32 (the public API asks for int64 first)
        with pytest.raises(TypeError, match=msg):
            aclnn.AclnnBackend().grouped_mm(x, w, Groups(False, gl, 6))


@pytest.mark.parametrize("which", ["x", "weight"])
def test_tensors_in_a_private_npu_format_are_refused(which):
    """The binding describes base formats only (op-plugin's ConvertType by rank); a FRACTAL_NZ tensor from
    torch_npu.npu_format_cast would be read as ND: refused, naming it, before anything reaches CANN."""
    import torch_npu_double
    path = cann_double.library()
    with torch_npu_double.installed(), cann_double.selected(path), __import__("gmm_plugin").settings(backend="aclnn"):
        cast = torch_npu_double.module().npu_format_cast
        x = torch.randn(6, 32, dtype=torch.bfloat16)
        w = torch.randn(3, 32, 16, dtype=torch.bfloat16)
        x, w = (cast(x, 29), w) if which == "x" else (x, cast(w, 29))
        runs = cann_double.count(path, "aclnnGroupedMatmulV5")
        with pytest.raises(ValueError, match=rf"^{which} is in NPU format FRACTAL_NZ \(29\); the aclnn backend "
                                             r"describes tensors as op-plugin does for base formats .* backend 'npu' "
                                             rf".*: torch_npu\.npu_format_cast\({which}, 2\)\.$"):
            gmm.npu_gmm_v2(x, w, group_list=torch.tensor([2, 0, 4]))
        with pytest.raises(ValueError, match=rf"^{which} is in NPU format FRACTAL_NZ"):  # the binding itself too
            aclnn.binding().grouped_matmul(x, w, torch.tensor([2, 0, 4]), 0, 1)
        assert cann_double.count(path, "aclnnGroupedMatmulV5") == runs


def cann_include() -> str | None:
    """A CANN include directory (aclnn/acl_meta.h, acl/acl_rt.h, aclnnop/aclnn_grouped_matmul_v5.h):
    GMM_PLUGIN_CANN_INCLUDE, else $ASCEND_HOME_PATH/include."""
    home = os.environ.get("ASCEND_HOME_PATH")
    d = os.environ.get("GMM_PLUGIN_CANN_INCLUDE") or (os.path.join(home, "include") if home else None)
    return d if d and os.path.isfile(os.path.join(d, "aclnnop", "aclnn_grouped_matmul_v5.h")) else None


CXX = shutil.which(os.environ.get("CXX", "c++"))
CANN_HEADERS = ("acl/acl_rt.h", "aclnn/acl_meta.h", "aclnnop/aclnn_grouped_matmul_v4.h",
                "aclnnop/aclnn_grouped_matmul_v5.h")


@pytest.mark.skipif(cann_include() is None or CXX is None, reason="no CANN include directory (GMM_PLUGIN_CANN_INCLUDE "
                                                                  "or $ASCEND_HOME_PATH/include) or no C++ compiler")
@pytest.mark.parametrize("source, flags", [(aclnn.SOURCE, ["-DGMM_PLUGIN_CANN_HEADERS"]),
                                           (cann_double.SOURCE, ["-x", "c++", "-DCANN_DOUBLE_CANN_HEADERS"])],
                         ids=["binding", "double"])
def test_declarations_are_cann_headers(source, flags):
    """Both compiled against CANN's own headers (included first, so a source that declares CANN's names its own
    way cannot compile): the binding asserts each function pointer type is the header's; each of the double's
    definitions would be a conflicting declaration of a C function otherwise."""
    first = [a for h in CANN_HEADERS for a in ("-include", h)]
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", *flags, "-I", cann_include(), *first, source]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
