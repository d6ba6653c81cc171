"""gradcheck, the seed's usage examples, empty/degenerate groups, layouts, and the device group_list path."""
from __future__ import annotations

import pytest
import torch

import gmm_plugin
from gmm_plugin.backends import get_backend
from gmm_plugin.function import Call, GroupedMatmulFunction
from gmm_plugin.group_list import Groups, make_groups
from gmm_plugin.ops import gmm
from reference import gmm_reference, tolerance


@pytest.mark.parametrize("group_type", [0, 2, -1])
def test_gradcheck_float64(backend, group_type):
    """gradcheck of the autograd Function itself (the public API only takes fp16/bf16/fp32)."""
    counts = [3, 0, 4, 2]
    e = len(counts)
    if group_type == 0:
        x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(e, 5, 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(e, 3, dtype=torch.float64, requires_grad=True)
    elif group_type == 2:
        x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
        w = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(e, 3, dtype=torch.float64, requires_grad=True)
    else:
        x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    groups = None if group_type == -1 else make_groups(counts, cumsum=False, total=9, device=x.device, axis="M")
    call = Call(group_type, groups, get_backend(backend), False, "fp32")
    assert torch.autograd.gradcheck(lambda a, b, c: GroupedMatmulFunction.apply(a, b, c, None, call), (x, w, bias))


def test_seed_example_cumsum_list(backend):
    """The spec's first example, unchanged except device placement (no .npu())."""
    num_expert, seq_len, hidden_dim = 8, 32, 256
    group_list = [1, 3, 6, 10, 15, 21, 28, 32]
    group_type = 0
    x_shape = (seq_len, hidden_dim)
    weight_shape = (num_expert, hidden_dim, seq_len)
    dtype = torch.float16
    x = (torch.rand(x_shape).to(dtype) - 0.5)
    weight = (torch.rand(weight_shape).to(dtype) - 0.5)
    x.requires_grad = True
    weight.requires_grad = True
    result = gmm.npu_gmm(x, weight, bias=None, group_list=group_list, group_type=group_type)
    result.backward(torch.ones(result.shape))
    counts = [1, 2, 3, 4, 5, 6, 7, 4]
    ref = gmm_reference(x, weight, counts)
    assert result.shape == (32, 32) and result.dtype == torch.float16
    assert (result.double() - ref).abs().max() <= tolerance(dtype, hidden_dim, ref.abs().max().item())
    # d/dx of sum(x_e @ W_e) is the row sum of W_e for every row of group e
    starts = [0] + group_list[:-1]
    want_gx = torch.cat([weight.detach().double()[e].sum(1).expand(c, -1) for e, c in enumerate(counts)])
    assert (x.grad.double() - want_gx).abs().max() <= tolerance(dtype, seq_len, want_gx.abs().max().item())
    want_gw = torch.stack([x.detach().double()[s:s + c].sum(0)[:, None].expand(-1, seq_len)
                           for s, c in zip(starts, counts)])
    assert (weight.grad.double() - want_gw).abs().max() <= tolerance(dtype, 8, want_gw.abs().max().item())

    weight_shape_trans = (num_expert, seq_len, hidden_dim)
    weight_trans = (torch.rand(weight_shape_trans).to(dtype) - 0.5)
    weight_trans.requires_grad = True
    result = gmm.npu_gmm(x, weight_trans.transpose(-1, -2), bias=None, group_list=group_list, group_type=group_type)
    ref = gmm_reference(x, weight_trans.transpose(-1, -2), counts)
    assert (result.double() - ref).abs().max() <= tolerance(dtype, hidden_dim, ref.abs().max().item())


def test_seed_example_counts_tensor(backend):
    """The spec's second example (npu_gmm_v2, counts tensor), device placement removed.

    As written, its counts [1, 3, 3, 4, 5, 6, 7, 4] sum to 33 for 32 rows: the kernel would read past
    x. We reject it with a clear error, then run it with counts that cover the 32 rows.
    """
    num_expert, seq_len, hidden_dim = 8, 32, 256
    group_list = torch.tensor([1, 3, 3, 4, 5, 6, 7, 4])
    group_type = 0
    dtype = torch.float16
    x = (torch.rand((seq_len, hidden_dim)).to(dtype) - 0.5)
    weight = (torch.rand((num_expert, hidden_dim, seq_len)).to(dtype) - 0.5)
    x.requires_grad = True
    weight.requires_grad = True
    with pytest.raises(ValueError, match=r"sum of group_list \(counts\) must equal x.shape\[0\] \(M\) = 32, got 33"):
        gmm.npu_gmm_v2(x, weight, bias=None, group_list=group_list, group_type=group_type)
    group_list = torch.tensor([1, 3, 3, 4, 5, 6, 6, 4])
    result = gmm.npu_gmm_v2(x, weight, bias=None, group_list=group_list, group_type=group_type)
    result.backward(torch.ones(result.shape))
    ref = gmm_reference(x, weight, group_list.tolist())
    assert (result.double() - ref).abs().max() <= tolerance(dtype, hidden_dim, ref.abs().max().item())
    assert weight.grad.shape == weight.shape and x.grad.shape == x.shape
    weight_trans = (torch.rand((num_expert, seq_len, hidden_dim)).to(dtype) - 0.5)
    weight_trans.requires_grad = True
    result = gmm.npu_gmm_v2(x, weight_trans.transpose(-1, -2), bias=None, group_list=group_list, group_type=group_type)
    result.backward(torch.ones(result.shape))
    ref = gmm_reference(x, weight_trans.transpose(-1, -2), group_list.tolist())
    assert (result.double() - ref).abs().max() <= tolerance(dtype, hidden_dim, ref.abs().max().item())
    assert weight_trans.grad.shape == weight_trans.shape


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_rows_and_all_zero_group_list(backend, api, dtype):
    x = torch.randn(0, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, 8, dtype=dtype, requires_grad=True)
    bias = torch.randn(4, 8, dtype=torch.float16 if dtype == torch.float16 else torch.float32, requires_grad=True)
    fn = gmm.npu_gmm_v2 if api == "v2" else gmm.npu_gmm
    y = fn(x, w, bias=bias, group_list=torch.zeros(4, dtype=torch.int64))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(bias.grad, torch.zeros_like(bias))
    assert x.grad.shape == (0, 16)
    # group_type 2 with an all-zero split axis: y is all zeros (plus bias)
    a = torch.randn(6, 0, dtype=dtype, requires_grad=True)
    b = torch.randn(0, 8, dtype=dtype, requires_grad=True)
    y2 = fn(a, b, group_list=[0, 0, 0], group_type=2)
    assert y2.shape == (3, 6, 8) and torch.equal(y2, torch.zeros_like(y2))


def test_empty_groups_get_zero_gradients(backend):
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    bias = torch.randn(4, 8, requires_grad=True)
    y = gmm.npu_gmm_v2(x, w, bias=bias, group_list=torch.tensor([0, 10, 0, 0]))
    (y * torch.randn_like(y)).sum().backward()
    for e in (0, 2, 3):
        assert torch.equal(w.grad[e], torch.zeros(16, 8)) and torch.equal(bias.grad[e], torch.zeros(8))
    assert w.grad[1].abs().sum() > 0


def test_single_group_is_a_plain_matmul(backend):
    """MindSpeed rejects a group_list of length 1; we accept it (documented difference)."""
    x, w = torch.randn(12, 16), torch.randn(1, 16, 8)
    for fn, gl in ((gmm.npu_gmm, [12]), (gmm.npu_gmm_v2, torch.tensor([12]))):
        y = fn(x, w, group_list=gl)
        assert torch.allclose(y, x @ w[0], atol=1e-5)


def test_transposed_weight_gets_transposed_gradient(backend):
    base = torch.randn(4, 8, 16, requires_grad=True)  # [E, N, K]
    w = base.transpose(-1, -2)
    captured = {}
    w.register_hook(lambda g: captured.setdefault("g", g))
    y = gmm.npu_gmm_v2(torch.randn(20, 16), w, group_list=torch.tensor([5, 5, 5, 5]))
    y.sum().backward()
    assert captured["g"].stride() == w.stride()  # no copy into another layout
    assert base.grad.is_contiguous()


@pytest.mark.parametrize("cumsum", [False, True])
def test_device_style_group_list_path_matches_host_path(backend, cumsum):
    """Groups built as for accelerator tensors (host=None, offsets computed on the device) give the same result."""
    counts = [4, 0, 7, 5]
    values = torch.tensor(counts).cumsum(0) if cumsum else torch.tensor(counts)
    device_groups = Groups(cumsum, values, 16, host=None)
    host_groups = make_groups(values, cumsum=cumsum, total=16, device=torch.device("cpu"), axis="M")
    be = get_backend(backend)
    x, w = torch.randn(16, 16), torch.randn(4, 16, 8)
    assert torch.equal(be.grouped_mm(x, w, device_groups), be.grouped_mm(x, w, host_groups))
    assert torch.equal(device_groups.counts(), host_groups.counts())
    assert torch.equal(device_groups.row_group_ids(), host_groups.row_group_ids())
    a, b = torch.randn(8, 16), torch.randn(16, 8)
    assert torch.equal(be.grouped_mm_k(a, b, device_groups), be.grouped_mm_k(a, b, host_groups))


@pytest.mark.parametrize("transposed", [False, True])
def test_fp16_cpu_weight_reaches_the_torch_backend_unconverted(transposed, monkeypatch):
    """fp16 on a CPU is computed in fp32; the torch backend converts the weight one group at a
    time (no fp32 copy of all of it) in forward and in backward, and the results still match."""
    from gmm_plugin.backends.torch_backend import TorchBackend
    seen = []
    real = TorchBackend.grouped_mm

    def spy(self, x, w, groups):
        seen.append((x.dtype, w.dtype))
        return real(self, x, w, groups)
    monkeypatch.setattr(TorchBackend, "grouped_mm", spy)
    if transposed:
        leaf = torch.randn(4, 8, 16, dtype=torch.float16, requires_grad=True)  # [E, N, K]
        w = leaf.transpose(-1, -2)
    else:
        leaf = w = torch.randn(4, 16, 8, dtype=torch.float16, requires_grad=True)
    counts = [3, 0, 9, 4]
    x = torch.randn(16, 16, dtype=torch.float16, requires_grad=True)
    gmm_plugin.set_backend("torch")
    try:
        y = gmm.npu_gmm_v2(x, w, group_list=counts)
        dy = torch.randn_like(y)
        y.backward(dy)
    finally:
        gmm_plugin.set_backend(None)
    assert seen == [(torch.float32, torch.float16)] * 2  # forward, then grad_x
    rx = x.detach().double().requires_grad_(True)
    rw = w.detach().double().requires_grad_(True)
    ref = gmm_reference(rx, rw, counts)
    ref.backward(dy.double())
    want_w = rw.grad.transpose(-1, -2) if transposed else rw.grad  # in the leaf's layout
    for got, want, k in ((y, ref, 16), (x.grad, rx.grad, 8), (leaf.grad, want_w, 9)):
        assert (got.double() - want).abs().max() <= tolerance(torch.float16, k, want.abs().max().item())
