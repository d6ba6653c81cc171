"""The patched experts hand tokens_per_expert to npu_gmm_v2 as they are: no cumsum, no host read.

Counted with a TorchFunctionMode over the experts' forward and backward. Inside the op's own
forward call the counter is paused: the op reads group_list on the host only when the caller
handed host data (here, on a CPU-only machine, the dispatcher's counts are host data); its
device-data path is covered by the core tests. Everything around it, and the whole backward,
is counted. The same counter sees SequentialMLP's .tolist() and the cumsum of the v1 form, so
it can fail.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
from patches import experts as ex  # noqa: E402

CUMSUM = {torch.cumsum, torch.Tensor.cumsum, torch.Tensor.cumsum_}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__index__}


class CallCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            if func in CUMSUM:
                self.calls["cumsum"] += 1
            elif func in HOST_READS:
                self.calls["host read"] += 1
            elif func is torch.Tensor.to and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values())):
                self.calls["host read"] += 1
        return func(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    """Records every group_list the experts hand to the op, and pauses the counter inside it."""
    seen = []
    counter = CallCounter()

    def wrap(name):
        real = getattr(ex.gmm_ops, name)

        def op(x, weight, **kwargs):
            seen.append((name, kwargs["group_list"]))
            counter.paused += 1
            try:
                return real(x, weight, **kwargs)
            finally:
                counter.paused -= 1
        monkeypatch.setattr(ex.gmm_ops, name, op)

    wrap("npu_gmm_v2")
    wrap("npu_gmm")
    return counter, seen


@pytest.fixture(scope="module", autouse=True)
def world():
    patches.revert()
    patches.apply({"backend": "torch"})
    h.ensure_world()
    yield
    patches.revert()


def _forward_backward(module, counts, counter):
    x = torch.randn(int(counts.sum()), module.config.hidden_size, requires_grad=True)
    probs = torch.rand(x.shape[0], requires_grad=True)
    dy = torch.randn(x.shape[0], module.config.hidden_size)
    with counter:
        out, _ = module(x, counts, probs)
        (out * dy).sum().backward()


@pytest.mark.parametrize("num", [1, 4])
def test_counts_go_straight_to_npu_gmm_v2(spy, num):
    counter, seen = spy
    module = h.build_grouped(num, h.make_config(experts=num))
    counts = torch.tensor([3, 0, 5, 2][:num])
    _forward_backward(module, counts, counter)
    assert [name for name, _ in seen] == ["npu_gmm_v2", "npu_gmm_v2"]
    assert all(group_list is counts for _, group_list in seen), "counts must be passed as they are"
    assert counter.calls["cumsum"] == 0
    assert counter.calls["host read"] == 0


def test_zero_token_rank_has_no_host_read_either(spy):
    counter, seen = spy
    module = h.build_grouped(4, h.make_config(experts=4))
    counts = torch.zeros(4, dtype=torch.int64)
    _forward_backward(module, counts, counter)
    assert len(seen) == 2 and counter.calls == collections.Counter()


def test_counter_sees_the_cumsum_of_the_v1_form(spy):
    counter, seen = spy
    patches.apply({"backend": "torch", "group_list_form": "cumsum"})
    try:
        module = h.build_grouped(4, h.make_config(experts=4))
        counts = torch.tensor([3, 0, 5, 2])
        _forward_backward(module, counts, counter)
    finally:
        patches.apply({"backend": "torch"})
    assert [name for name, _ in seen] == ["npu_gmm", "npu_gmm"]
    assert [g.tolist() for _, g in seen] == [[3, 3, 8, 10]] * 2
    assert counter.calls["cumsum"] == 2


def test_counter_sees_sequential_mlps_tolist(spy):
    counter, _ = spy
    module = h.build_sequential(4, h.make_config(experts=4))
    _forward_backward(module, torch.tensor([3, 0, 5, 2]), counter)
    assert counter.calls["host read"] >= 1


def test_host_counts_for_device_tokens_go_to_the_op_as_they_are(monkeypatch):
    """Counts on the host and tokens elsewhere ("meta" stands for the accelerator here): int64
    counts reach npu_gmm_v2 as the same tensor, no copy (the op keeps host counts on the host:
    gmm_plugin.group_list.Groups); int32 counts are widened to int64 where they are."""
    seen = []
    monkeypatch.setattr(ex.gmm_ops, "npu_gmm_v2",
                        lambda x, w, group_list, **kw: seen.append(group_list) or x.new_empty(x.shape[0], w.shape[-1]))
    x = torch.empty(10, 16, device="meta")
    w = torch.empty(4, 16, 8, device="meta")
    counts = torch.tensor([3, 0, 5, 2])
    ex.grouped_linear(x, w, counts)
    ex.grouped_linear(x, w, counts.to(torch.int32))
    assert seen[0] is counts
    assert seen[1].device.type == "cpu" and seen[1].dtype == torch.int64 and seen[1].tolist() == [3, 0, 5, 2]


def test_the_op_takes_host_counts_without_a_device_copy():
    """What the experts rely on: npu_gmm_v2 accepts the dispatcher's host int64 counts whatever
    x's device, and float counts are refused with a TypeError naming group_list."""
    from gmm_plugin import checks
    x = torch.empty(10, 16, device="meta")
    checks.check_group_list_type(torch.tensor([3, 0, 5, 2]), cumsum=False, group_type=0)
    checks.check_devices(x, group_list=torch.tensor([3, 0, 5, 2]))
    with pytest.raises(TypeError, match="group_list"):
        ex.grouped_linear(torch.randn(10, 16), torch.randn(4, 16, 8), torch.tensor([3.0, 0.0, 5.0, 2.0]))
