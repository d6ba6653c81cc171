"""The host-read counter (tests/sync_counter.py) and the operator's own paths with host data.

The counter must see what would block on an accelerator, or the sync-free tests that use it
prove nothing: each kind of read is shown counted here, next to the op's paths that must not
read anything back.
"""
from __future__ import annotations

import pytest
import torch

import gmm_plugin
from sync_counter import count_host_reads


def _fwd_bwd(x, w, group_list, **kwargs):
    y = gmm_plugin.npu_gmm_v2(x, w, group_list=group_list, **kwargs)
    y.backward(torch.ones_like(y))


@pytest.mark.parametrize("read", ["item", "tolist", "cpu", "bool", "to"])
def test_counter_sees_every_kind_of_read_of_device_data(read):
    t = torch.arange(4, device="cpu")  # a device named: stands for accelerator memory
    with count_host_reads() as reads:
        {"item": lambda: t[0].item(), "tolist": t.tolist, "cpu": t.cpu, "bool": lambda: bool(t[1]),
         "to": lambda: t.to("cpu")}[read]()
    assert reads.total == 1, reads.report()


def test_counter_lets_host_data_and_what_the_host_makes_of_it_be():
    counts = torch.tensor([3, 0, 5])
    with count_host_reads(host=[counts]) as reads:
        counts.tolist()
        counts.long().cumsum(0).tolist()   # computed on the host from host data: still host
        torch.tensor([1, 2]).tolist()      # made on the host
    assert reads.total == 0, reads.report()


def test_counter_sees_fallback_ops_on_device_data():
    ok = torch.tensor(True, device="cpu")
    with count_host_reads(fallback_ops=(torch._assert_async,)) as reads:
        torch._assert_async(ok)
    assert reads.calls == {"_assert_async (CPU fallback)": 1}


@pytest.mark.parametrize("fusion", [False, True])
def test_host_counts_cost_no_read_on_any_path(backend, fusion):
    """The dispatcher's counts are host data: forward, dX, dW and the fused dW read nothing back."""
    counts = torch.tensor([5, 0, 7, 4])
    x = torch.randn(16, 8, device="cpu", requires_grad=True)
    w = torch.randn(4, 8, 6, device="cpu", requires_grad=True)
    kwargs = {}
    if fusion:
        w.main_grad = torch.zeros(4, 8, 6, device="cpu")
        w.grad_added_to_main_grad = False
        kwargs = {"gemm_fusion": True, "original_weight": w}
    with count_host_reads(host=[counts]) as reads:
        _fwd_bwd(x, w, counts, **kwargs)
    assert reads.total == 0, reads.report()


def test_device_only_group_list_on_a_loop_path_is_read_back_once_and_counted():
    """What the counter exists to catch: sizes that live only on the device (Groups as
    make_groups builds them for accelerator data), handed to a kernel that loops over groups on
    the host (the reference backend), are read back once, by Groups.segments()."""
    from gmm_plugin.backends import get_backend
    from gmm_plugin.group_list import Groups
    counts = torch.tensor([5, 0, 7, 4], device="cpu")  # a device named: device data
    groups = Groups(False, counts, 16)
    x = torch.randn(16, 8, device="cpu")
    w = torch.randn(4, 8, 6, device="cpu")
    with count_host_reads() as reads:
        get_backend("reference").grouped_mm(x, w, groups)
        get_backend("reference").grouped_mm_k(x.t(), torch.randn(16, 6, device="cpu"), groups)
    assert reads.calls == {"tolist": 1}, reads.report()
