"""A Megatron expert layer on the plugin reads nothing back to the host, forward and backward.

tokens_per_expert is what Megatron's dispatchers hand the experts: host data (CPU int64). Every
other tensor stands for accelerator memory (tests/sync_counter.py). On every backend that runs
here, with and without gemm_fusion into main_grad, in both group_list forms, the layer's forward
and backward make zero device-to-host reads; Megatron's SequentialMLP, counted the same way,
makes some (its .tolist()), so the count can fail.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
from sync_counter import count_host_reads  # noqa: E402

BACKENDS = ["torch", "reference"]


@pytest.fixture(scope="module", autouse=True)
def world():
    h.ensure_world()


def _run(module, counts, fusion, host=None):
    hidden = module.config.hidden_size
    x = torch.randn(int(sum(counts.tolist())), hidden, device="cpu", requires_grad=True)
    probs = torch.rand(x.shape[0], device="cpu", requires_grad=True)
    dy = torch.randn(x.shape[0], hidden, device="cpu")
    if fusion:  # as Megatron's DDP sets parameters up
        for p in module.parameters():
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device="cpu")
            p.grad_added_to_main_grad = False
    with count_host_reads(host=[counts] if host is None else host) as reads:
        out, _ = module(x, counts, probs)
        out.backward(dy)
    return reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("form", ["counts", "cumsum"])
def test_expert_layer_makes_no_host_read(backend, fusion, form):
    patches.revert()
    patches.apply({"backend": backend, "group_list_form": form, "gemm_fusion": fusion})
    try:
        module = h.build_grouped(4, h.make_config(experts=4))
        reads = _run(module, torch.tensor([3, 0, 5, 2]), fusion)
    finally:
        patches.revert()
    assert reads.total == 0, reads.report()


def test_zero_token_rank_makes_no_host_read():
    patches.revert()
    patches.apply({"backend": "torch"})
    try:
        module = h.build_grouped(4, h.make_config(experts=4))
        reads = _run(module, torch.zeros(4, dtype=torch.int64), fusion=True)
    finally:
        patches.revert()
    assert reads.total == 0, reads.report()


@pytest.mark.parametrize("experts", ["plugin", "SequentialMLP"])
def test_the_count_sees_reads_of_counts_that_live_on_the_device(experts):
    """Negative control: the same runs with tokens_per_expert standing for device memory (as the
    NCCL-EP dispatcher leaves it) are counted: the plugin's layer and Megatron's SequentialMLP
    (its .tolist()) both read the counts on the host then."""
    patches.revert()
    patches.apply({"backend": "torch", "cpu_shim": "on"})
    try:
        config = h.make_config(experts=4)
        module = h.build_grouped(4, config) if experts == "plugin" else h.build_sequential(4, config)
        counts = torch.tensor([3, 0, 5, 2])
        reads = _run(module, counts, fusion=False, host=())
    finally:
        patches.revert()
    assert reads.total >= 1, reads.report()
