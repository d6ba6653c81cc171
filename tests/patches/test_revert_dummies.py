"""patches.revert() drops the DDP dummy gradients the patched experts' fused backward cached
(issue 21 item 6), even while the layers that used them still live."""
from __future__ import annotations

import gc

import torch

import patches
from gmm_plugin import fusion
from gmm_plugin.ops import gmm


def _live_dummies(shape):
    gc.collect()
    return [t for t in gc.get_objects() if type(t) is torch.Tensor and tuple(t.shape) == shape]


def test_revert_drops_the_cached_dummies():
    shape = (3, 20, 44)
    p = torch.nn.Parameter(torch.randn(*shape))
    p.main_grad, p.grad_added_to_main_grad = torch.zeros(shape), False
    patches.apply({"backend": "torch", "cpu_shim": "off"})
    try:
        gmm.npu_gmm_v2(torch.randn(6, 20), p, group_list=[1, 2, 3], gemm_fusion=True,
                       original_weight=p).sum().backward()
        p.grad = None  # DDP's hook
        assert len(_live_dummies(shape)) == 2  # the main_grad and the cached dummy
    finally:
        patches.revert()
    assert [t is p.main_grad for t in _live_dummies(shape)] == [True]  # 39daed2 kept the dummy
    assert fusion.dummy_bytes() == 0
