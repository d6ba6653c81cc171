"""The npu backend against the torch_npu test double (torch_npu 7.3.0, the torch 2.9.0 build, on an
Atlas A2): the exact arguments it passes, every kernel limit, device group_list sanitising,
torch_npu import hygiene and error messages. What differs between torch_npu releases is in
test_npu_releases.py.

The whole op suite (tests/ops, tests/test_fusion.py) also runs through this backend, once per
release (the double's VARIANTS). These tests pin what those cannot see: the calls themselves.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gmm_plugin
import torch_npu_double as double
from gmm_plugin.backends import npu as npu_backend
from gmm_plugin.backends.npu import NpuBackend
from gmm_plugin.backends.torch_backend import TorchBackend
from gmm_plugin.group_list import Groups, make_groups
from gmm_plugin.ops import gmm
from reference import gmm_reference, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def npu():
    """The npu backend forced, on the double (as on an NPU: fused wgrad in fp32), its call log cleared."""
    with double.as_on_an_npu(double.DEFAULT_RELEASE), gmm_plugin.settings(backend="npu"):
        double.calls.clear()
        yield double.calls


def kernel_calls(calls, op="npu_grouped_matmul"):
    return [kw for name, kw in calls if name == op]


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int) -> bool:
    """Within the dtype's tolerance of the float64 reference (tests/reference.py)."""
    return (got.double() - ref).abs().max().item() <= tolerance(dtype, k, ref.abs().max().item())


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr()


# ---- the exact arguments ------------------------------------------------------------------------

def test_npu_gmm_passes_cumsum_as_group_list_type_0(npu):
    x, w = torch.randn(10, 8), torch.randn(3, 8, 5)
    y = gmm.npu_gmm(x, w, group_list=[3, 3, 10])
    (kw,) = kernel_calls(npu)
    assert (kw["split_item"], kw["group_type"], kw["group_list_type"], kw["bias"]) == (3, 0, 0, None)
    assert kw["group_list"].dtype == torch.int64 and kw["group_list"].tolist() == [3, 3, 10]
    assert len(kw["x"]) == 1 and len(kw["weight"]) == 1
    assert same_memory(kw["x"][0], x) and same_memory(kw["weight"][0], w) and kw["weight"][0].shape == (3, 8, 5)
    assert close(y, gmm_reference(x, w, [3, 0, 7]), torch.float32, 8)


def test_npu_gmm_v2_passes_counts_untouched_as_group_list_type_1(npu):
    x, w = torch.randn(10, 8), torch.randn(3, 8, 5)
    counts = torch.tensor([3, 0, 7])
    gmm.npu_gmm_v2(x, w, group_list=counts)
    (kw,) = kernel_calls(npu)
    assert (kw["split_item"], kw["group_type"], kw["group_list_type"]) == (3, 0, 1)
    assert kw["group_list"].tolist() == [3, 0, 7]  # counts, not their cumsum


@pytest.mark.parametrize("api, values, gl_type", [("v1", [3, 3, 10], 0), ("v2", [3, 0, 7], 1)])
def test_backward_calls(npu, api, values, gl_type):
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 5, requires_grad=True)
    fn = gmm.npu_gmm if api == "v1" else gmm.npu_gmm_v2
    y = fn(x, w, group_list=torch.tensor(values))
    npu.clear()
    dy = torch.randn(10, 5)
    y.backward(dy)
    dx, dw = kernel_calls(npu)
    # dx = gmm(dy, W^T): group_type 0 with the weight as a transposed view (no copy)
    assert (dx["group_type"], dx["split_item"], dx["group_list_type"]) == (0, 3, gl_type)
    assert same_memory(dx["weight"][0], w) and dx["weight"][0].shape == (3, 5, 8) and dx["weight"][0].stride(-2) == 1
    assert dx["group_list"].tolist() == values
    # dW = gmm(x^T, dy): group_type 2, x a transposed view, weight dy
    assert (dw["group_type"], dw["split_item"], dw["group_list_type"]) == (2, 3, gl_type)
    assert same_memory(dw["x"][0], x) and dw["x"][0].shape == (8, 10) and dw["x"][0].stride() == (1, 8)
    assert dw["weight"][0].shape == (10, 5) and dw["group_list"].tolist() == values
    counts = [3, 0, 7]
    assert torch.allclose(w.grad.double(), torch.stack([x[s:s + c].double().t() @ dy[s:s + c].double() for s, c in
                                                       zip([0, 3, 3], counts)]), atol=1e-4)


@pytest.mark.parametrize("layout", ["stacked", "transposed"])
@pytest.mark.parametrize("api", ["v1", "v2"])
def test_fusion_calls_grouped_matmul_add_with_cumsum(npu, layout, api):
    e, k, n, m, counts = 3, 8, 6, 10, [3, 0, 7]
    shape = (e, k, n) if layout == "stacked" else (e, n, k)
    p = torch.nn.Parameter(torch.randn(*shape, dtype=torch.bfloat16))
    p.main_grad = torch.zeros(shape, dtype=torch.float32)
    p.grad_added_to_main_grad = False
    w = p if layout == "stacked" else p.transpose(-1, -2)
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    values = counts if api == "v2" else [3, 3, 10]
    y = (gmm.npu_gmm_v2 if api == "v2" else gmm.npu_gmm)(x, w, group_list=torch.tensor(values), gemm_fusion=True,
                                                          original_weight=p)
    npu.clear()
    dy = torch.randn(m, n, dtype=torch.bfloat16)
    y.backward(dy)
    assert [kw["group_type"] for kw in kernel_calls(npu)] == [0]  # dx only: no separate dW product
    (add,) = kernel_calls(npu, "npu_grouped_matmul_add_")
    assert (add["transpose_x"], add["transpose_weight"], add["group_type"]) == (True, False, 2)
    assert "group_list_type" not in add  # 7.3.0's schema has none (test_npu_releases.py: 26.0.0)
    assert add["group_list"].tolist() == [3, 3, 10]  # aclnnGroupedMatmulAdd reads cumulative sums only
    assert same_memory(add["self"], p.main_grad) and add["self"].shape == shape and add["self"].is_contiguous()
    if layout == "stacked":   # main_grad[e] += x_e^T dy_e
        assert same_memory(add["x"], x) and same_memory(add["weight"], dy)
        assert add["x"].shape == (m, k) and add["weight"].shape == (m, n)
    else:                     # main_grad[e] (= (x_e^T dy_e)^T) += dy_e^T x_e
        assert same_memory(add["weight"], x) and add["x"].shape == (m, n) and add["weight"].shape == (m, k)
    ref = torch.stack([x[s:s + c].double().t() @ dy[s:s + c].double() for s, c in zip([0, 3, 3], counts)])
    got = p.main_grad if layout == "stacked" else p.main_grad.transpose(-1, -2)
    assert torch.allclose(got.double(), ref, rtol=0, atol=1e-3 * ref.abs().max().item())


# ---- kernel limits ------------------------------------------------------------------------------

def test_many_groups_split_into_calls_of_at_most_1024(npu):
    e = 1030
    counts = [i % 3 for i in range(e)]
    x = torch.randn(sum(counts), 4, requires_grad=True)
    w = torch.randn(e, 4, 2, requires_grad=True)
    y = gmm.npu_gmm_v2(x, w, group_list=torch.tensor(counts))
    y.backward(torch.ones_like(y))
    calls = kernel_calls(npu)
    assert all(len(kw["group_list"]) <= 1024 for kw in calls)
    assert [kw["group_type"] for kw in calls].count(2) == 2  # dW in two calls too
    assert close(y, gmm_reference(x, w, counts), torch.float32, 4)
    assert torch.allclose(w.grad[2], x[1:3].sum(0)[:, None].expand(4, 2))  # group 2 holds rows 1..2


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("device_style", [False, True])
def test_chunking_every_case(monkeypatch, api, device_style):
    """Limit patched to 3 groups a call: chunks of one group, empty chunks, cumsum rebasing."""
    monkeypatch.setattr(npu_backend, "MAX_GROUPS_PER_CALL", 3)
    counts = [2, 0, 3, 0, 0, 0, 1, 4, 0, 2]
    total = sum(counts)
    values = counts if api == "v2" else torch.tensor(counts).cumsum(0).tolist()
    groups = make_groups(values, cumsum=api == "v1", total=total, device=torch.device("cpu"), axis="M")
    if device_style:  # as a device group_list would arrive: no host copy
        groups = Groups(groups.cumsum, groups.values, total, host=None)
    x, w = torch.randn(total, 5), torch.randn(len(counts), 5, 3)
    a, b = torch.randn(total, 4).t(), torch.randn(total, 6)
    out = torch.randn(len(counts), 4, 6)
    out_ref = out.clone()
    with double.installed():
        double.calls.clear()
        y = NpuBackend().grouped_mm(x, w, groups)
        gk = NpuBackend().grouped_mm_k(a, b, groups)
        NpuBackend().accumulate_k(out, a.bfloat16(), b.bfloat16(), groups, wgrad_dtype="fp32")
    assert all(len(kw["group_list"]) <= 3 for _, kw in double.calls)
    assert close(y, gmm_reference(x, w, counts), torch.float32, 5)
    assert close(gk, gmm_reference(a, b, counts, group_type=2), torch.float32, total)
    ref_out = out_ref.double() + gmm_reference(a.bfloat16(), b.bfloat16(), counts, group_type=2)
    assert torch.allclose(out.double(), ref_out, atol=1e-4)


def test_length_one_group_list_never_reaches_the_gmm_kernel(npu):
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(1, 4, 3, requires_grad=True)
    y = gmm.npu_gmm_v2(x, w, group_list=torch.tensor([6]))
    y.backward(torch.ones_like(y))
    assert kernel_calls(npu) == []
    assert torch.allclose(y, x @ w[0]) and torch.allclose(w.grad[0], x.sum(0)[:, None].expand(4, 3))


def test_length_one_with_fusion_uses_the_add_op(npu):
    p = torch.nn.Parameter(torch.randn(1, 4, 3, dtype=torch.bfloat16))
    p.main_grad = torch.zeros(1, 4, 3)
    x = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    gmm.npu_gmm_v2(x, p, group_list=torch.tensor([6]), gemm_fusion=True, original_weight=p).sum().backward()
    (add,) = kernel_calls(npu, "npu_grouped_matmul_add_")
    assert add["group_list"].tolist() == [6]
    assert torch.allclose(p.main_grad[0].double(), x.double().sum(0)[:, None].expand(4, 3), atol=1e-2)


@pytest.mark.parametrize("wide", ["K", "N"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_dims_of_65536_or_more_are_split(npu, wide, dtype):
    k, n = (65537, 3) if wide == "K" else (3, 65537)
    counts = [1, 2]
    x = torch.randn(3, k, dtype=dtype, requires_grad=True)
    w = torch.randn(2, k, n, dtype=dtype, requires_grad=True)
    y = gmm.npu_gmm_v2(x, w, group_list=torch.tensor(counts))
    dy = torch.randn_like(y)
    y.backward(dy)
    for kw in kernel_calls(npu):
        xt, wt = kw["x"][0], kw["weight"][0]
        x_last = xt.shape[0] if kw["group_type"] == 2 else xt.shape[1]
        w_last = wt.shape[-2] if wt.dim() == 3 and not wt.is_contiguous() else wt.shape[-1]
        assert x_last < 65536 and w_last < 65536
    # K blocks are partial sums, each rounded once, added in float32: within the same tolerance
    assert close(y, gmm_reference(x, w, counts), dtype, k)
    gx_ref = torch.cat([dy[:1].double() @ w[0].double().t(), dy[1:].double() @ w[1].double().t()])
    assert close(x.grad, gx_ref, dtype, n)
    gw_ref = torch.stack([x[:1].double().t() @ dy[:1].double(), x[1:].double().t() @ dy[1:].double()])
    assert close(w.grad, gw_ref, dtype, 2)


def test_wide_fusion_falls_back_to_block_accumulation(npu):
    k = 65537
    p = torch.nn.Parameter(torch.randn(2, k, 2, dtype=torch.bfloat16))
    p.main_grad = torch.zeros(2, k, 2)
    x = torch.randn(3, k, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(3, 2, dtype=torch.bfloat16)
    gmm.npu_gmm_v2(x, p, group_list=torch.tensor([1, 2]), gemm_fusion=True, original_weight=p).backward(dy)
    assert kernel_calls(npu, "npu_grouped_matmul_add_") == []  # P >= 65536: not fusable, no kernel error
    ref = torch.stack([x[:1].double().t() @ dy[:1].double(), x[1:].double().t() @ dy[1:].double()])
    assert torch.allclose(p.main_grad.double(), ref, atol=0.05)


def test_dims_beyond_int32_are_a_clear_error_before_any_call():
    x = torch.zeros(1, 1).expand(2**31, 1)  # no memory behind it
    groups = Groups(False, torch.tensor([2**31, 0]), 2**31, host=None)
    with double.installed():
        double.calls.clear()
        with pytest.raises(ValueError, match="too large for the aclnn GroupedMatmul kernel"):
            NpuBackend().grouped_mm(x, torch.zeros(2, 1, 1), groups)
    assert double.calls == []


@pytest.mark.parametrize("values, cumsum", [([2, 1, 1], False), ([6, 0, 9], False), ([-3, 9, 2], False),
                                            ([2, 9, 9], False), ([2, 1, 3], True), ([2, 7, 9], True),
                                            ([5, 2, 6], True), ([-1, 3, 6], True)])
@pytest.mark.parametrize("limit", [1024, 2])
def test_bad_device_group_list_never_reaches_the_kernel(monkeypatch, values, cumsum, limit):
    """Overrunning, short, negative or decreasing device group_lists: sanitised before the kernel,
    so it reads nothing outside x and leaves no row uninitialised (the async assert reports them);
    with a limit of 2 groups a call, the same through several calls."""
    monkeypatch.setattr(npu_backend, "MAX_GROUPS_PER_CALL", limit)
    total = 6
    groups = Groups(cumsum, torch.tensor(values), total, host=None)
    x, w = torch.randn(total, 4), torch.randn(3, 4, 2)
    a, b = torch.randn(total, 3).t(), torch.randn(total, 5)
    with double.installed():  # the double raises KernelContractViolation on any unsafe group_list
        y = NpuBackend().grouped_mm(x, w, groups)
        gk = NpuBackend().grouped_mm_k(a, b, groups)
        out = torch.zeros(3, 3, 5)
        NpuBackend().accumulate_k(out, a.bfloat16(), b.bfloat16(), groups, wgrad_dtype="fp32")
    # Documented sanitising: counts are clamped to [0, total], a shortfall goes to the last group,
    # an overrun sends every row to the last group; cumsum offsets are clamped, made non-decreasing
    # and end at total (Groups.safe_offsets, as in the torch backend).
    if cumsum:
        ends = [min(max(v, 0), total) for v in values]
        ends = [max(ends[:i + 1]) for i in range(len(ends))][:-1] + [total]
        counts = [b - a for a, b in zip([0] + ends[:-1], ends)]
    else:
        counts = [min(max(v, 0), total) for v in values]
        counts = counts[:-1] + [counts[-1] + total - sum(counts)] if sum(counts) <= total else [0, 0, total]
    assert close(y, gmm_reference(x, w, counts), torch.float32, 4)
    assert close(gk, gmm_reference(a, b, counts, group_type=2), torch.float32, total)
    assert torch.allclose(out.double(), gmm_reference(a.bfloat16(), b.bfloat16(), counts, group_type=2), atol=1e-4)
    if cumsum:  # the same numbers as the torch backend
        assert torch.allclose(y, TorchBackend().grouped_mm(x, w, Groups(True, torch.tensor(values), total, None)))


def test_device_mismatch_has_mindspeeds_message():
    groups = Groups(False, torch.tensor([1, 1], device="meta"), 2, host=None)
    with double.installed(), pytest.raises(RuntimeError) as info:
        NpuBackend().grouped_mm(torch.randn(2, 3), torch.randn(2, 3, 4), groups)
    assert str(info.value) == ("Expected all tensors to be on the same device, but found at least two devices, "
                               "cpu(arg0) and meta(group_list)!")


def test_empty_operands_make_no_call(npu):
    x = torch.randn(0, 4, requires_grad=True)
    w = torch.randn(2, 4, 3, requires_grad=True)
    y = gmm.npu_gmm_v2(x, w, group_list=torch.tensor([0, 0]))
    y.sum().backward()
    assert y.shape == (0, 3) and kernel_calls(npu) == [] and torch.equal(w.grad, torch.zeros(2, 4, 3))


# ---- torch_npu availability ---------------------------------------------------------------------

def test_supports_cpu_only_under_the_double():
    backend = NpuBackend()
    assert backend.supports(torch.device("cpu")) is ("torch_npu" in sys.modules and npu_backend.is_test_double())
    with double.installed():
        assert backend.supports(torch.device("cpu"))
    assert not backend.supports(torch.device("cuda", 0)) and not backend.supports(torch.device("meta"))


def test_missing_torch_npu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` fails
    with pytest.raises(ImportError) as info:
        npu_backend.load_torch_npu()
    msg = str(info.value)
    assert "torch_npu" in msg and "CANN 8.0.RC3" in msg and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in msg


def test_a_torch_npu_without_the_op_is_a_clear_error(monkeypatch):
    bare = double.module("7.3.0", soc="Ascend910B4")  # another module object: its own cache entry
    monkeypatch.delattr(bare, "npu_grouped_matmul")
    monkeypatch.setitem(sys.modules, "torch_npu", bare)
    with pytest.raises(RuntimeError, match=r"torch_npu 2\.9\.0 has no npu_grouped_matmul"):
        npu_backend.load_torch_npu()


def test_forcing_npu_on_cpu_without_torch_npu_is_an_error():
    assert "torch_npu" not in sys.modules or not npu_backend.is_test_double()
    gmm_plugin.set_backend("npu")
    try:
        with pytest.raises(ValueError, match="backend 'npu' cannot run on device cpu"):
            gmm.npu_gmm_v2(torch.randn(2, 3), torch.randn(2, 3, 4), group_list=torch.tensor([1, 1]))
    finally:
        gmm_plugin.set_backend(None)


def test_import_never_imports_torch_npu(tmp_path):
    """A torch_npu that blows up on import: gmm_plugin, CPU calls and `gmm-plugin info` never touch it."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("raise RuntimeError('torch_npu was imported')\n")
    code = ("import sys, torch, gmm_plugin\n"
            "from gmm_plugin.backends import npu\n"
            "y = gmm_plugin.npu_gmm_v2(torch.randn(4, 3), torch.randn(2, 3, 2), group_list=torch.tensor([1, 3]))\n"
            "from gmm_plugin import cli; cli.main(['info'])\n"
            "assert 'torch_npu' not in sys.modules\n"
            "print('OK')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    env.pop("GMM_PLUGIN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK") and "installed, not imported" not in proc.stdout


# ---- the double itself raises where the real ops would -------------------------------------------

def gmm_args(**kw):
    base = dict(group_list=torch.tensor([2, 2]), split_item=3, group_type=0, group_list_type=1)
    base.update(kw)
    return base


@pytest.mark.parametrize("x, w, kw, error, match", [
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(group_type=None), RuntimeError, "Requires manual passing"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(split_item=0), RuntimeError, "split_item 2 or 3"),
    (torch.randn(3, 4).t(), torch.randn(2, 3, 2), {}, RuntimeError, "x must be contiguous"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(group_type=1), RuntimeError, "must be -1, 0 or 2"),
    (torch.randn(4, 3), torch.randn(2, 6, 2)[:, ::2], {}, RuntimeError, "contiguous or a transposed view"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(group_list=[2, 2]), NotImplementedError, "npu_grouped_matmul.List"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(group_list=torch.tensor([2, 2], dtype=torch.int32)),
     RuntimeError, "int64"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(group_list=torch.tensor([2, 3])), double.KernelContractViolation,
     "read out of bounds"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(group_list=torch.tensor([2, 1])), double.KernelContractViolation,
     "uninitialised"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(group_list=torch.tensor([3, 2]), group_list_type=0),
     double.KernelContractViolation, "decreasing"),
    (torch.randn(4, 3), torch.randn(1, 3, 2), dict(group_list=torch.tensor([4])), double.KernelContractViolation,
     "length 1"),
    (torch.randn(4, 3).double(), torch.randn(2, 3, 2).double(), {}, RuntimeError, "float16, bfloat16"),
    (torch.randn(2, 65536), torch.randn(2, 65536, 1), dict(group_list=torch.tensor([1, 1])), RuntimeError,
     "below 65536"),
    (torch.randn(4, 3), torch.randn(1025, 3, 1), dict(group_list=torch.zeros(1025, dtype=torch.int64)),
     RuntimeError, "at most 1024"),
    (torch.randn(3, 4), torch.randn(4, 2), dict(group_type=2), RuntimeError, "x should be transposed"),
    (torch.randn(4, 3), torch.randn(2, 3, 2), dict(x_dtype=1), RuntimeError, "Unknown keyword argument 'x_dtype'"),
])
def test_double_gmm_rejects(x, w, kw, error, match):
    """On 7.3.0: the dispatcher's own errors (x_dtype is 26.0.0's), op-plugin's, CANN's, and the
    silent mishandlings the double turns into KernelContractViolation."""
    with pytest.raises(error, match=match):
        double.module("7.3.0").npu_grouped_matmul([x], [w], **gmm_args(**kw))


def test_double_add_op_contract():
    add_ = double.module("7.3.0").npu_grouped_matmul_add_
    x, dy = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(5, 3, dtype=torch.bfloat16)
    out = torch.ones(2, 4, 3)
    gl = torch.tensor([2, 5])
    assert add_(out, x, dy, gl) is out
    ref = 1 + torch.stack([x[:2].double().t() @ dy[:2].double(), x[2:].double().t() @ dy[2:].double()])
    assert torch.allclose(out.double(), ref, atol=1e-5)
    with pytest.raises(RuntimeError, match="self must be contiguous"):
        add_(torch.ones(2, 3, 4).transpose(-1, -2), x, dy, gl)
    with pytest.raises(RuntimeError, match="float16 or both bfloat16"):
        add_(out, x.float(), dy.float(), gl)
    with pytest.raises(double.KernelContractViolation, match="read out of bounds"):
        add_(out, x, dy, torch.tensor([2, 6]))
    with pytest.raises(double.KernelContractViolation, match="decreasing"):  # counts [2, 3] read as cumsum: fine,
        add_(out, x, dy, torch.tensor([3, 2]))                                # [3, 2] is not a cumsum


# ---- tensors in a private NPU format (torch_npu.npu_format_cast) --------------------------------

def nz(t: torch.Tensor) -> torch.Tensor:
    """t in FRACTAL_NZ, as torch_npu.npu_format_cast(t, 29) gives it (the double's stand-in)."""
    return double.module(double.DEFAULT_RELEASE).npu_format_cast(t, 29)


def test_a_fractal_nz_weight_reaches_npu_grouped_matmul_whole(npu):
    """op-plugin 7.1.0+ runs an NZ weight on aclnnGroupedMatmulWeightNz (described by its storage desc):
    forward and dX get the weight itself (dX as a transposed view), dW does not involve it."""
    x = torch.randn(10, 32, dtype=torch.bfloat16, requires_grad=True)
    w = nz(torch.randn(3, 32, 16, dtype=torch.bfloat16)).requires_grad_(True)
    assert npu_backend.private_format(w) == 29
    y = gmm.npu_gmm_v2(x, w, group_list=torch.tensor([3, 0, 7]))
    dy = torch.randn_like(y)
    y.backward(dy)
    fwd, dx, dw = kernel_calls(npu)
    assert fwd["kernel"] == dx["kernel"] == "aclnnGroupedMatmulWeightNz" and dw["kernel"] == "aclnnGroupedMatmulV5"
    # The same memory and shape, not `is`: torch 2.1's Function.apply hands forward another tensor object.
    assert same_memory(fwd["weight"][0], w) and fwd["weight"][0].shape == w.shape
    assert same_memory(dx["weight"][0], w) and dx["weight"][0].shape == (3, 16, 32)
    ref_x = x.detach().double().requires_grad_(True)
    ref_w = w.detach().double().requires_grad_(True)
    ref = gmm_reference(ref_x, ref_w, [3, 0, 7])
    ref.backward(dy.double())
    assert close(y, ref, torch.bfloat16, 32)
    assert close(x.grad, ref_x.grad, torch.bfloat16, 16) and close(w.grad, ref_w.grad, torch.bfloat16, 10)


@pytest.mark.parametrize("case", ["slices of experts", "one expert", "split K"])
def test_a_private_format_operand_the_backend_would_slice_is_refused(npu, monkeypatch, case):
    """Where the backend cuts the weight (1024-group slices, one expert's matmul) or builds split-K views, a
    private layout would be read through a view neither op-plugin nor CANN defines: a ValueError naming it."""
    monkeypatch.setattr(npu_backend, "MAX_GROUPS_PER_CALL", 2)  # 3 experts: two calls on slices of the weight
    experts = 1 if case == "one expert" else 3
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    w = nz(torch.randn(experts, 32, 16, dtype=torch.bfloat16))
    counts = [6] if experts == 1 else [2, 0, 4]
    npu.clear()
    if case == "split K":  # group_type 2: x [M, K'] grouped along K', weight [K', N]
        with pytest.raises(ValueError, match=r"^weight is in NPU format FRACTAL_NZ \(29\); the npu backend passes "
                                             r"tensors in a private format to the kernel only whole, and split-K"):
            gmm.npu_gmm_v2(torch.randn(8, 6, dtype=torch.bfloat16), nz(torch.randn(6, 16, dtype=torch.bfloat16)),
                           group_list=torch.tensor([2, 4]), group_type=2)
    else:
        detail = "more than 2 experts go to the kernel in slices" if experts == 3 else \
            r"one expert is a plain matmul of weight\[0\]"
        with pytest.raises(ValueError, match=rf"^weight is in NPU format FRACTAL_NZ \(29\); .*{detail}\. Cast it to "
                                             r"ND first: torch_npu\.npu_format_cast\(weight, 2\)\.$"):
            gmm.npu_gmm_v2(x, w, group_list=torch.tensor(counts))
    assert kernel_calls(npu) == []
    nd = double.module(double.DEFAULT_RELEASE).npu_format_cast(w, 2)  # the way out the message names
    ok = gmm.npu_gmm_v2(x, nd, group_list=torch.tensor(counts))
    assert close(ok, gmm_reference(x, w, counts), torch.bfloat16, 32)


@pytest.mark.parametrize("release, cann, kernel", [
    ("7.0.0", None, "aclnnGroupedMatmulV4"),              # no NZ branch: V4, whose CheckFormat takes NZ weights
    ("7.3.0", None, "aclnnGroupedMatmulWeightNz"),
    ("26.0.0", None, "aclnnGroupedMatmulWeightNz"),
    ("7.3.0", frozenset({"aclnnGroupedMatmulV4", "aclnnGroupedMatmulV5"}), "current CANN version do not support"),
])
def test_nz_weights_by_release(release, cann, kernel):
    """What each release's op-plugin does with an NZ weight (GroupedMatmulKernelNpuOpApi.cpp at its tag)."""
    x = torch.randn(6, 32, dtype=torch.float16)
    w = nz(torch.randn(2, 32, 16, dtype=torch.float16))
    groups = Groups(False, torch.tensor([2, 4]), 6, host=(2, 4))
    with double.installed(release, cann_kernels=cann):
        double.calls.clear()
        if kernel.startswith("aclnn"):
            y = NpuBackend().grouped_mm(x, w, groups)
            assert kernel_calls(double.calls)[0]["kernel"] == kernel
            assert close(y, gmm_reference(x, w, [2, 4]), torch.float16, 32)
        else:
            with pytest.raises(RuntimeError, match=kernel):
                NpuBackend().grouped_mm(x, w, groups)


def test_the_double_reports_formats_with_torch_npus_schema():
    m = double.module("7.3.0")
    assert str(m.get_npu_format.default._schema).endswith("::get_npu_format(Tensor self) -> int")
    w = torch.randn(2, 20, 8, dtype=torch.bfloat16)
    assert m.get_npu_format(w) == 2 and m.npu_format_cast(w, 2) is w
    w_nz = m.npu_format_cast(w, 29)
    assert m.get_npu_format(w_nz) == 29 and m.get_npu_format(w_nz.transpose(-1, -2)) == 29  # the storage's
    assert double.formats.storage_sizes(w_nz) == (2, 1, 2, 16, 16) and torch.equal(w_nz, w)
    with pytest.raises(double.KernelContractViolation, match="a view .* into a storage of NPU format 29"):
        m.npu_grouped_matmul([torch.randn(4, 32, dtype=torch.bfloat16)],
                             [m.npu_format_cast(torch.randn(3, 32, 16, dtype=torch.bfloat16), 29)[1:]],
                             **gmm_args(group_list=torch.tensor([2, 2])))
