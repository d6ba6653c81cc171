"""gemm_fusion's main_grad rules, checked at the call (issue 21 item 8), and the lifetime of the
DDP dummy gradients (item 6): freed with the parameters that use them."""
from __future__ import annotations

import gc

import pytest
import torch

from gmm_plugin import fusion
from gmm_plugin.ops import gmm

COUNTS = [1, 2, 3, 4]


def _param(main_grad, shape=(4, 16, 8)):
    p = torch.nn.Parameter(torch.randn(*shape))
    p.main_grad = main_grad
    p.grad_added_to_main_grad = False
    return p


def _call(p, x=None):
    x = torch.randn(10, p.shape[1]) if x is None else x
    return gmm.npu_gmm_v2(x, p, group_list=COUNTS, gemm_fusion=True, original_weight=p)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_a_main_grad_of_another_dtype_is_refused_at_the_call(dtype):
    p = _param(torch.zeros(4, 16, 8, dtype=dtype))
    with pytest.raises(TypeError, match=r"original_weight\.main_grad dtype must be one of float32, bfloat16, "
                                        rf"float16, float64 .*got {dtype}"):
        _call(p)  # the forward: before 39daed2 failed in backward, inside torch
    assert not p.main_grad.any()


def test_a_main_grad_that_requires_grad_is_refused_at_the_call():
    p = _param(torch.zeros(4, 16, 8, requires_grad=True))
    with pytest.raises(ValueError, match=r"original_weight\.main_grad must not require grad"):
        _call(p)


def test_main_grad_shape_and_device_are_checked_at_the_call():
    with pytest.raises(ValueError, match=r"main_grad has shape \(4, 16, 7\)"):
        _call(_param(torch.zeros(4, 16, 7)))
    with pytest.raises(ValueError, match=r"main_grad is on meta but weight is on cpu"):
        _call(_param(torch.zeros(4, 16, 8, device="meta")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_allowed_main_grad_dtype_gets_the_gradient(dtype):
    p = _param(torch.zeros(4, 16, 8, dtype=dtype))
    x = torch.randn(10, 16)
    _call(p, x).sum().backward()
    want, s = [], 0
    for c in COUNTS:  # float64 reference, per group
        want.append(x[s:s + c].double().t() @ torch.ones(c, 8, dtype=torch.float64))
        s += c
    tol = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 0.1, torch.float16: 1e-2}[dtype]
    assert (p.main_grad.double() - torch.stack(want)).abs().max() <= tol  # values <= ~10: dtype's rounding


# ---- item 6: the dummies live as long as their parameters ---------------------------------------

SHAPES = [((5, 24, 40), (5, 40, 24)), ((3, 24, 56), (3, 56, 24)), ((7, 24, 40), (7, 40, 24))]


def _live_tensors_of(shapes):
    gc.collect()
    # Concrete shapes only: earlier tests of the suite may leave fake tensors with symbolic sizes
    # (unhashable SymInts) alive, and those are none of ours.
    return [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor)
            and all(type(d) is int for d in t.shape) and tuple(t.shape) in shapes]


def _fused_layer_step(fc1, fc2):
    e = fc1.shape[0]
    x = torch.randn(4 * e, fc1.shape[1], requires_grad=True)
    counts = [4] * e
    h = gmm.npu_gmm_v2(x, fc1, group_list=counts, gemm_fusion=True, original_weight=fc1)
    y = gmm.npu_gmm_v2(h.relu(), fc2, group_list=counts, gemm_fusion=True, original_weight=fc2)
    y.sum().backward()
    for p in (fc1, fc2):  # what DDP's hook does with the dummy once it sees grad_added_to_main_grad
        assert p.grad_added_to_main_grad and p.grad is not None
        p.grad = None


def test_dummies_are_freed_with_the_layers_that_used_them():
    shapes = {s for pair in SHAPES for s in pair}
    assert not _live_tensors_of(shapes)
    layers = [tuple(_param(torch.zeros(s), s) for s in pair) for pair in SHAPES]
    for fc1, fc2 in layers:
        _fused_layer_step(fc1, fc2)
    del fc1, fc2
    dummies = [t for t in _live_tensors_of(shapes) if not isinstance(t, torch.nn.Parameter)
               and not any(t is p.main_grad for layer in layers for p in layer)]
    assert sorted(tuple(t.shape) for t in dummies) == sorted(s for pair in SHAPES for s in pair)
    del dummies
    layers.pop(0)
    assert {tuple(t.shape) for t in _live_tensors_of(shapes)} == \
        {s for pair in SHAPES[1:] for s in pair}  # the deleted layer's weights, main_grads and dummies
    del layers
    assert not _live_tensors_of(shapes)  # 39daed2 kept its 6 dummies for the life of the process


def test_a_shared_dummy_lives_while_any_of_its_parameters_does():
    gc.collect()
    before = fusion.dummy_bytes()  # other tests' parameters may still be collected later
    a, b = (_param(torch.zeros(4, 16, 9), (4, 16, 9)) for _ in range(2))
    _call(a).sum().backward()
    _call(b).sum().backward()
    assert a.grad.untyped_storage().data_ptr() == b.grad.untyped_storage().data_ptr()
    a.grad = b.grad = None
    del a
    assert fusion.dummy_bytes() - before == 4 * 4 * 16 * 9
    del b
    assert fusion.dummy_bytes() == before


def test_release_dummies_drops_them_and_the_next_backward_makes_a_new_one():
    p = _param(torch.zeros(4, 16, 8))
    _call(p).sum().backward()
    p.grad = None
    assert fusion.dummy_bytes() > 0
    fusion.release_dummies()
    assert fusion.dummy_bytes() == 0
    _call(p).sum().backward()
    assert p.grad.shape == p.shape and fusion.dummy_bytes() == 4 * p.numel()
