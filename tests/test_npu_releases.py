"""The npu backend on every torch_npu release it can meet.

tests/torch_npu_double registers each release's ops with torch's dispatcher under that release's
exact schemas (op-plugin's op_plugin_functions.yaml at the commit the release pins) and models
op-plugin's per-release C++ below them. So a call with an argument the release lacks fails here
as it fails on an NPU (the group_list_type that broke every fused weight gradient on 7.1.0-7.3.0),
and what a release accepts but would silently mishandle (counts to aclnnGroupedMatmulAdd V1)
fails as KernelContractViolation.

Every release-specific path runs on every release: forward, dX, dW, the fused add into main_grad,
more than 1024 groups, the transposed weight, and a slice of the op suite's value sweep (which
runs whole on 7.3.0). test_release_matrix prints what the backend does on each release.
Nothing here ran on Ascend hardware.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import gmm_plugin
import torch_npu_double as double
from gmm_plugin.backends import npu as npu_backend
from gmm_plugin.backends.npu import NpuBackend
from gmm_plugin.group_list import Groups, make_groups
from gmm_plugin.ops import gmm
from reference import gmm_reference, tolerance
from sync_counter import count_host_reads

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ops"))
from test_gmm_values import check_case  # noqa: E402  (the op suite's float64 comparison)

VARIANTS = {v.id: v for v in double.VARIANTS}
HAS_CC = double.cann.ascend_home(frozenset({"aclnnGroupedMatmulAddV2"})) is not None

# What the backend must do on each release, from op-plugin's sources (docs/npu.md has the table):
# (dW without fusion, the fused weight gradient)
EXPECTED = {
    "npu-7.0.0": ("per-expert mm (no group_type 2)", "per-expert mm + add (no add op)"),
    "npu-7.1.0": ("per-expert mm (group_type 2 rejected)", "add_ cumsum -> aclnnGroupedMatmulAdd"),
    "npu-7.2.0": ("npu_grouped_matmul group_type 2", "add_ cumsum -> aclnnGroupedMatmulAdd"),
    "npu-7.3.0": ("npu_grouped_matmul group_type 2", "add_ cumsum -> aclnnGroupedMatmulAdd"),
    "npu-26.0.0-a2": ("npu_grouped_matmul group_type 2", "add_ cumsum -> aclnnGroupedMatmulAdd"),
    "npu-26.0.0-950": ("npu_grouped_matmul group_type 2",
                       "add_ counts, group_list_type=1 -> aclnnGroupedMatmulAddV2" if HAS_CC else
                       "add_ cumsum -> aclnnGroupedMatmulAdd"),
}


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def release(request):
    """The npu backend on one release's double, as on an NPU (fused wgrad in fp32), calls log cleared."""
    with VARIANTS[request.param].enter(), gmm_plugin.settings(backend="npu"):
        double.calls.clear()
        yield request.param


def ops(name, calls=None):
    return [kw for op, kw in (double.calls if calls is None else calls) if op == name]


def close(got, ref, dtype, k):
    return (got.double() - ref).abs().max().item() <= tolerance(dtype, k, ref.abs().max().item())


def megatron_param(shape, dtype):
    p = torch.nn.Parameter(torch.randn(*shape, dtype=dtype))
    p.main_grad = torch.zeros(shape, dtype=torch.float32)
    p.grad_added_to_main_grad = False
    return p


def summary(calls) -> tuple[str, str, str]:
    """(forward, dW, fused dW) as the calls recorded by the double show them."""
    gmm_calls = ops("npu_grouped_matmul", calls)
    fwd = gmm_calls[0]
    forward = f"npu_grouped_matmul group_type {fwd['group_type']}, group_list_type {fwd['group_list_type']}"
    k_split = [kw for kw in gmm_calls if kw["group_type"] == 2]
    return forward, k_split, ops("npu_grouped_matmul_add_", calls)


def describe_dw(k_split_calls) -> str:
    if not k_split_calls:
        return "per-expert mm (no group_type 2)"
    if len(k_split_calls) == 1 and k_split_calls[0]["release"] == "7.1.0":
        return "per-expert mm (group_type 2 rejected)"
    return "npu_grouped_matmul group_type 2"


def describe_fused(add_calls) -> str:
    if not add_calls:
        return "per-expert mm + add (no add op)"
    (add,) = add_calls
    form = "counts, group_list_type=1" if add.get("group_list_type") == 1 else "cumsum"
    return f"add_ {form} -> {add['kernel']}"


# ---- the matrix ---------------------------------------------------------------------------------

def _one_step(release_id):
    """Forward, dX, dW (no fusion) and a fused step, npu_gmm_v2 with the dispatcher's host counts."""
    counts = [3, 0, 7]
    rel, config = double.RELEASE_VARIANTS[release_id]
    with double.as_on_an_npu(rel, fresh=True, **config), gmm_plugin.settings(backend="npu"):  # nothing learnt yet
        double.calls.clear()
        x = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(3, 8, 6, dtype=torch.bfloat16, requires_grad=True)
        gmm.npu_gmm_v2(x, w, group_list=torch.tensor(counts)).sum().backward()
        forward, k_split, _ = summary(double.calls)
        ref = torch.stack([x[s:s + c].double().t().sum(1, keepdim=True).expand(8, 6)
                           for s, c in zip([0, 3, 3], counts)])
        assert torch.allclose(w.grad.double(), ref, atol=0.1), release_id
        p = megatron_param((3, 8, 6), torch.bfloat16)
        double.calls.clear()
        gmm.npu_gmm_v2(x.detach(), p, group_list=torch.tensor(counts), gemm_fusion=True,
                       original_weight=p).sum().backward()
        assert torch.allclose(p.main_grad.double(), ref, atol=1e-3), release_id
        status = npu_backend.status()
        return forward, describe_dw(k_split), describe_fused(ops("npu_grouped_matmul_add_")), status


def test_release_matrix(capsys):
    rows = {rid: _one_step(rid) for rid in VARIANTS}
    with double.installed("6.0.0"), gmm_plugin.settings(backend="npu"):
        with pytest.raises(RuntimeError) as info:
            gmm.npu_gmm_v2(torch.randn(4, 3), torch.randn(2, 3, 2), group_list=torch.tensor([1, 3]))
    width = max(map(len, rows)) + 2
    lines = ["", "torch_npu release matrix (the npu backend on tests/torch_npu_double; no Ascend hardware):",
             f"{'release':<{width}}{'forward / dX':<52}{'dW':<40}fused dW (gemm_fusion)"]
    for rid, (forward, dw, fused, _) in rows.items():
        lines.append(f"{rid:<{width}}{forward:<52}{dw:<40}{fused}")
    lines.append(f"{'npu-6.0.0':<{width}}error: {str(info.value)[:110]}...")
    with capsys.disabled():
        print("\n".join(lines))
    assert "6.0-era" in str(info.value) and "backend 'aclnn'" in str(info.value)
    for rid, (forward, dw, fused, status) in rows.items():
        assert forward == "npu_grouped_matmul group_type 0, group_list_type 1", rid  # counts passed as given
        assert (dw, fused) == EXPECTED[rid], rid
        assert status.startswith("ready: torch_npu " + double.RELEASES[rid.split("-")[1]].torch_npu_version), status


# ---- every path on every release ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["w", "wT"])
@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_dx_dw_against_float64(release, api, layout, dtype):
    counts = [4, 0, 9, 3]
    x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
    leaf = torch.randn(*((4, 8, 6) if layout == "w" else (4, 6, 8)), dtype=dtype, requires_grad=True)
    w = leaf if layout == "w" else leaf.transpose(-1, -2)
    values = counts if api == "v2" else torch.tensor(counts).cumsum(0).tolist()
    y = (gmm.npu_gmm_v2 if api == "v2" else gmm.npu_gmm)(x, w, group_list=torch.tensor(values))
    dy = torch.randn(16, 6, dtype=dtype)
    y.backward(dy)
    rx, rw = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ry = gmm_reference(rx, rw, counts)
    ry.backward(dy.double())
    assert close(y, ry, dtype, 8) and close(x.grad, rx.grad, dtype, 6)
    got_w = leaf.grad if layout == "w" else leaf.grad.transpose(-1, -2)
    assert close(got_w, rw.grad, dtype, 9)
    fwd, dx = ops("npu_grouped_matmul")[:2]
    assert fwd["group_list_type"] == dx["group_list_type"] == (1 if api == "v2" else 0)
    assert fwd["group_list"].tolist() == values  # the caller's form, untouched
    assert dx["weight"][0].data_ptr() == leaf.data_ptr()  # dX reads the weight transposed, no copy


@pytest.mark.parametrize("layout", ["stacked", "transposed"])
@pytest.mark.parametrize("api", ["v1", "v2"])
def test_fused_weight_gradient_over_micro_batches(release, api, layout):
    e, k, n, counts = 3, 8, 6, [3, 0, 7]
    shape = (e, k, n) if layout == "stacked" else (e, n, k)
    p = megatron_param(shape, torch.bfloat16)
    w = p if layout == "stacked" else p.transpose(-1, -2)
    values = counts if api == "v2" else [3, 3, 10]
    truth = torch.zeros(e, k, n, dtype=torch.float64)
    bound = 0.0
    for _ in range(2):
        x = torch.randn(10, k, dtype=torch.bfloat16)
        dy = torch.randn(10, n, dtype=torch.bfloat16)
        (gmm.npu_gmm_v2 if api == "v2" else gmm.npu_gmm)(x, w, group_list=torch.tensor(values), gemm_fusion=True,
                                                          original_weight=p).backward(dy)
        p.grad_added_to_main_grad = False
        step = torch.stack([x[s:s + c].double().t() @ dy[s:s + c].double() for s, c in zip([0, 3, 3], counts)])
        truth += step
        bound += tolerance(torch.float32, 7, step.abs().max().item())
    got = p.main_grad if layout == "stacked" else p.main_grad.transpose(-1, -2)
    assert (got.double() - truth).abs().max().item() <= bound  # fp32 products and sums
    adds = ops("npu_grouped_matmul_add_")
    if release == "npu-7.0.0":
        assert adds == []
        return
    assert len(adds) == 2 and all(a["self"].data_ptr() == p.main_grad.data_ptr() for a in adds)
    if adds[0]["kernel"] == "aclnnGroupedMatmulAddV2" and api == "v2":
        assert adds[0]["group_list_type"] == 1 and adds[0]["group_list"].tolist() == counts
    else:  # V1 reads cumulative sums; 7.1.0-7.3.0 have no group_list_type to pass at all
        assert adds[0]["group_list"].tolist() == [3, 3, 10] and adds[0].get("group_list_type", 0) == 0


@pytest.mark.parametrize("fusion", [False, True])
def test_more_than_1024_groups(release, fusion):
    e = 1030
    counts = [i % 3 for i in range(e)]
    x = torch.randn(sum(counts), 4, dtype=torch.bfloat16, requires_grad=True)
    p = megatron_param((e, 4, 2), torch.bfloat16)
    kwargs = {"gemm_fusion": True, "original_weight": p} if fusion else {}
    y = gmm.npu_gmm_v2(x, p, group_list=torch.tensor(counts), **kwargs)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert all(len(kw["group_list"]) <= 1024 for name, kw in double.calls if "group_list" in kw)
    assert close(y, gmm_reference(x, p, counts), torch.bfloat16, 4)
    want = gmm_reference(x.t(), dy, counts, group_type=2)
    got = p.main_grad if fusion else p.grad
    assert close(got, want, torch.float32 if fusion else torch.bfloat16, 2)


@pytest.mark.parametrize("group_type", [0, 2])
@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "wT"])
def test_value_sweep_slice(release, group_type, api, transposed):
    """The op suite's float64 comparison (tests/ops/test_gmm_values.py), bf16, with bias, 8 groups (one
    empty), on the releases where the whole sweep does not run."""
    if release == f"npu-{double.DEFAULT_RELEASE}":
        pytest.skip("the whole sweep runs on this release in tests/ops")
    check_case("npu", group_type, api, "tensor", transposed, True, torch.bfloat16, 8)


# ---- what each release would get wrong ----------------------------------------------------------

def test_7_1_to_7_3_reject_group_list_type_as_the_old_backend_passed_it():
    """The reproduction of the issue: the backend used to pass group_list_type=0 to the add op, which
    7.1.0-7.3.0 do not have; every fused weight gradient failed there."""
    for rel in ("7.1.0", "7.2.0", "7.3.0"):
        add_ = double.module(rel).npu_grouped_matmul_add_
        x, dy = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(5, 3, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match=r"expected at most 7 argument\(s\) but received 8 argument\(s\)"):
            add_(torch.zeros(2, 4, 3), x, dy, torch.tensor([2, 5]), transpose_x=True, transpose_weight=False,
                 group_type=2, group_list_type=0)


def test_26_0_on_a2_a3_would_misread_counts():
    """26.0.0 takes group_list_type, but on Atlas A2/A3 runs aclnnGroupedMatmulAdd (V1), which reads
    group_list as cumulative sums: counts would silently give wrong gradients."""
    x, dy = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(5, 3, dtype=torch.bfloat16)
    for soc in ("Ascend910B3", "Ascend910_9391"):
        with double.installed("26.0.0", soc=soc) as m:
            with pytest.raises(double.KernelContractViolation, match="reads group_list as cumulative sums"):
                m.npu_grouped_matmul_add_(torch.zeros(2, 4, 3), x, dy, torch.tensor([2, 3]), group_list_type=1)
            assert not npu_backend.ops_of(m).add_takes_counts


def test_26_0_on_950_takes_counts_only_where_cann_has_add_v2():
    without_v2 = frozenset({"aclnnGroupedMatmulV4", "aclnnGroupedMatmulV5", "aclnnGroupedMatmulAdd"})
    with double.installed("26.0.0", soc="Ascend950", cann_kernels=without_v2) as m:
        assert not npu_backend.ops_of(m).add_takes_counts  # op-plugin runs V1 there too
        x, dy = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(5, 3, dtype=torch.bfloat16)
        out = torch.zeros(2, 4, 3)
        NpuBackend().accumulate_k(out, x.t(), dy, make_groups([2, 3], cumsum=False, total=5, device=x.device,
                                                                axis="M"), wgrad_dtype="fp32")
        (add,) = ops("npu_grouped_matmul_add_")[-1:]
        assert add["kernel"] == "aclnnGroupedMatmulAdd" and add["group_list"].tolist() == [2, 5]
        assert torch.allclose(out[1].double(), x[2:].double().t() @ dy[2:].double(), atol=1e-4)
    if not HAS_CC:
        pytest.skip("no C compiler: the stand-in CANN library exporting aclnnGroupedMatmulAddV2 cannot be built")
    with double.installed("26.0.0", soc="Ascend950") as m:
        assert npu_backend.ops_of(m).add_takes_counts


def test_6_0_is_a_clear_error_naming_the_way_out():
    with double.installed("6.0.0") as m:
        with pytest.raises(RuntimeError) as info:
            npu_backend.load_torch_npu()
    msg = str(info.value)
    assert f"torch_npu {m.__version__} is too old" in msg and "host int[] group_list" in msg
    assert "7.0.0 or newer" in msg and "backend 'aclnn'" in msg


def test_7_1_finds_out_once_that_group_type_2_is_rejected():
    with double.as_on_an_npu("7.1.0", fresh=True), gmm_plugin.settings(backend="npu"):
        double.calls.clear()
        for _ in range(2):
            x = torch.randn(10, 8, requires_grad=True)
            w = torch.randn(3, 8, 6, requires_grad=True)
            gmm.npu_gmm_v2(x, w, group_list=torch.tensor([3, 0, 7])).sum().backward()
        assert [kw["group_type"] for kw in ops("npu_grouped_matmul")] == [0, 0, 2, 0, 0]  # one try, then per expert
        assert torch.allclose(w.grad[2], x[3:].sum(0)[:, None].expand(8, 6))


@pytest.mark.parametrize("rel, reads", [("7.3.0", 0), ("26.0.0", 0), ("7.0.0", 1), ("7.1.0", 1)])
def test_device_only_group_list_is_read_back_only_where_split_k_loops(rel, reads):
    """A group_list that lives only on the device (not what Megatron hands over): the kernels take it
    as it is; only the per-expert split-K path of 7.0.0/7.1.0 needs its bounds on the host (one read,
    Groups.segments, cached for the call's fused and unfused products)."""
    counts = torch.tensor([4, 0, 9, 3], device="cpu")  # a device named: device data for the counter
    x = torch.randn(16, 8, device="cpu", dtype=torch.bfloat16)
    w = torch.randn(4, 8, 6, device="cpu", dtype=torch.bfloat16)
    b = torch.randn(16, 6, device="cpu", dtype=torch.bfloat16)
    out = torch.zeros(4, 8, 6, device="cpu")
    with double.installed(rel):
        NpuBackend().grouped_mm_k(x.t(), b, Groups(False, counts, 16))  # 7.1.0 learns group_type 2 is rejected
        groups = Groups(False, counts, 16)  # one call's groups: forward, dW and the fused dW share them
        with count_host_reads(fallback_ops=(torch._assert_async,)) as seen:
            y = NpuBackend().grouped_mm(x, w, groups)
            dw = NpuBackend().grouped_mm_k(x.t(), b, groups)
            NpuBackend().accumulate_k(out, x.t(), b, groups, wgrad_dtype="fp32")
    assert seen.total == reads, seen.report()
    want = gmm_reference(x.t(), b, [4, 0, 9, 3], group_type=2)
    assert close(y, gmm_reference(x, w, [4, 0, 9, 3]), torch.bfloat16, 8)
    assert close(dw, want, torch.bfloat16, 9) and close(out, want, torch.float32, 9)
