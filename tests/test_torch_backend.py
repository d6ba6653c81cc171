"""The torch backend's products allocate their result and nothing else (on a CPU, every extra
large block can grow glibc's heap, and fresh heap pages cost a page fault each on first touch)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gmm_plugin.backends import get_backend
from gmm_plugin.group_list import make_groups


def _allocations(fn):
    """(bytes of every allocation fn makes on the calling thread, fn's result)."""
    fn()  # once before: what a process does once (torch_caps' probes of the installed torch) is not fn's
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return [s for s in sizes if s > 0], out


@pytest.mark.parametrize("product", ["grouped_mm", "grouped_mm_k"])
def test_a_native_product_allocates_only_its_result(product):
    backend = get_backend("torch")
    x, w = torch.randn(512, 64), torch.randn(4, 64, 96)
    groups = make_groups([100, 0, 300, 112], cumsum=False, total=512, device=x.device, axis="x")
    groups.safe_offsets()  # built once per call and shared by its products
    if product == "grouped_mm":
        allocations, out = _allocations(lambda: backend.grouped_mm(x, w, groups))
    else:
        a, b = x.t(), torch.randn(512, 96)
        allocations, out = _allocations(lambda: backend.grouped_mm_k(a, b, groups))
    assert allocations == [out.numel() * out.element_size()]
