"""A Megatron expert layer on the npu backend reads nothing back to the host, forward and backward,
on every torch_npu release the backend runs on (tests/torch_npu_double).

tokens_per_expert is what Megatron's dispatchers hand the experts: host data (CPU int64); every
other tensor stands for NPU memory (tests/sync_counter.py). torch._assert_async counts as a read
of device data: torch_npu registers no kernel for it (neither torch_npu's native functions nor
op-plugin's yaml name it), so on an NPU it runs through torch_npu's CPU fallback
(VariableFallbackKernel.cpp, npu_cpu_fallback), a blocking device-to-host copy.

What this cannot see: what torch_npu and CANN do inside one op (the double's kernels read their
group_list to model the device, invisible to the counter), and the patches' copy of host counts to
an NPU, which never happens here (tokens and counts are both CPU tensors). On hardware,
torch_npu.npu.set_sync_debug_mode("error") is the check.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
import torch_npu_double as double  # noqa: E402
from gmm_plugin import checks  # noqa: E402
from gmm_plugin.group_list import make_groups  # noqa: E402
from sync_counter import count_host_reads  # noqa: E402

NPU_FALLBACK = (torch._assert_async,)
# One release per distinct path (26.0.0 on an A2 takes 7.3.0's): per-expert split K without the add op,
# per-expert split K with it, the kernels with cumulative sums, the kernels with counts to AddV2.
RELEASES = ["npu-7.0.0", "npu-7.1.0", "npu-7.3.0", "npu-26.0.0-950"]


@pytest.fixture(scope="module", autouse=True)
def world():
    h.ensure_world()


def _layer_step(release, *, fusion, form, host=None):
    rel, config = double.RELEASE_VARIANTS[release]
    counts = torch.tensor([3, 0, 5, 2])
    patches.revert()
    with double.installed(rel, **config):
        patches.apply({"backend": "npu", "group_list_form": form, "gemm_fusion": fusion,
                       "fused_wgrad_dtype": "fp32", "check_group_list": True})
        try:
            module = h.build_grouped(4, h.make_config(experts=4, dtype=torch.bfloat16))
            hidden = module.config.hidden_size
            x = torch.randn(10, hidden, dtype=torch.bfloat16, requires_grad=True)
            probs = torch.rand(10, requires_grad=True)
            dy = torch.randn(10, hidden, dtype=torch.bfloat16)
            if fusion:  # as Megatron's DDP sets parameters up
                for p in module.parameters():
                    p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
                    p.grad_added_to_main_grad = False
            double.calls.clear()
            with count_host_reads(host=[counts] if host is None else host, fallback_ops=NPU_FALLBACK) as reads:
                out, _ = module(x, counts, probs)
                out.backward(dy)
            names = [name for name, _ in double.calls]
        finally:
            patches.revert()
    return reads, names, module


@pytest.mark.parametrize("form", ["counts", "cumsum"])
@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("release", RELEASES)
def test_expert_layer_makes_no_host_read_on_the_npu_backend(release, fusion, form):
    reads, names, module = _layer_step(release, fusion=fusion, form=form)
    assert reads.total == 0, reads.report()
    assert "npu_grouped_matmul" in names  # the layer really ran on the double's kernels
    if fusion and release != "npu-7.0.0":
        assert names.count("npu_grouped_matmul_add_") == 2  # both expert GEMMs' wgrad fused into main_grad
    if fusion:
        assert all(p.main_grad.abs().sum() > 0 for p in module.parameters())


def test_the_count_sees_reads_when_the_counts_live_on_the_device():
    """Negative control: the same step with tokens_per_expert standing for device memory is counted
    (Groups reads a CPU group_list with .tolist(); on an NPU that tensor would be host data)."""
    reads, _, _ = _layer_step("npu-7.3.0", fusion=True, form="counts", host=())
    assert reads.total >= 1, reads.report()


def test_the_old_copy_then_device_assert_is_counted_and_gone_for_npu_tensors():
    """What the issue found: host counts copied to the device, then checked there by
    torch._assert_async, which torch_npu runs through the CPU fallback (a blocking copy back).
    The counter sees that path; make_groups now checks host counts on the host and calls the device
    assert only on devices with an asynchronous kernel for it (a meta tensor stands for an NPU one
    here: no such kernel either)."""
    counts = torch.tensor([3, 0, 5, 2])
    with count_host_reads(host=[counts], fallback_ops=NPU_FALLBACK) as reads:
        on_device = counts.to(device="cpu", non_blocking=True, copy=True)  # the old path's copy (copy=True: on
        # this machine the "device" is the CPU, where .to() would hand back counts itself)
        checks.assert_group_list_async(on_device, cumsum=False, total=10)
    assert reads.calls == {"_assert_async (CPU fallback)": 1}, reads.report()
    with count_host_reads(host=[counts], fallback_ops=NPU_FALLBACK) as reads:
        make_groups(counts, cumsum=False, total=10, device=torch.device("cpu"), axis="M")  # host data
        make_groups(torch.tensor([3, 0, 5, 2], device="meta"), cumsum=False, total=10,
                    device=torch.device("meta"), axis="M")
    assert reads.total == 0, reads.report()
