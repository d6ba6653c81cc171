"""gemm_fusion: weight gradients accumulated into original_weight.main_grad (Megatron's protocol)."""
from __future__ import annotations

import types

import pytest
import torch

import gmm_plugin
from gmm_plugin import Settings, settings
from gmm_plugin.ops import gmm
from reference import gmm_reference, tolerance


def megatron_param(shape, dtype, *, ddp_flag=True, main_grad_dtype=torch.float32):
    p = torch.nn.Parameter(torch.randn(*shape, dtype=dtype))
    p.main_grad = torch.zeros(shape, dtype=main_grad_dtype)
    if ddp_flag:
        p.grad_added_to_main_grad = False
    return p


def expected_wgrad(x, dy, counts):
    """float64 x_e^T dy_e per group, stacked [E, K, N]."""
    out, s = [], 0
    for c in counts:
        out.append(x[s:s + c].double().t() @ dy[s:s + c].double())
        s += c
    return torch.stack(out)


LAYOUTS = ["megatron_flat", "stacked", "transposed"]


def view_of(p, layout, e, k, n):
    if layout == "megatron_flat":   # GroupedMLP: P [K, E*N] viewed as [E, K, N]
        return p.view(e, k, n)
    if layout == "stacked":         # P [E, K, N]
        return p
    return p.transpose(-1, -2)      # P [E, N, K] passed transposed


@pytest.fixture
def fp32_products(backend):
    """gemm_fusion with fp32 products (MindSpeed's GroupedMatmulAdd contract), whatever the device."""
    previous = settings.configure(fused_wgrad_dtype="fp32")
    yield backend
    settings.configure(previous)


def param_shape(layout, e, k, n):
    return {"megatron_flat": (k, e * n), "stacked": (e, k, n), "transposed": (e, n, k)}[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("api,form", [("v1", "list"), ("v1", "tensor"), ("v2", "list"), ("v2", "tensor")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_main_grad_matches_reference_over_micro_batches(fp32_products, layout, api, form, dtype):
    e, k, n, m = 4, 16, 8, 24
    p = megatron_param(param_shape(layout, e, k, n), dtype)
    total = torch.zeros(e, k, n, dtype=torch.float64)
    for step, counts in enumerate([[6, 0, 10, 8], [0, 0, 24, 0], [3, 5, 7, 9]]):  # 3 micro-batches, empty groups
        x = torch.randn(m, k, dtype=dtype, requires_grad=True)
        values = counts if api == "v2" else torch.tensor(counts).cumsum(0).tolist()
        group_list = torch.tensor(values) if form == "tensor" else values
        fn = gmm.npu_gmm_v2 if api == "v2" else gmm.npu_gmm
        w = view_of(p, layout, e, k, n)
        y = fn(x, w, group_list=group_list, gemm_fusion=True, original_weight=p)
        dy = torch.randn(m, n, dtype=dtype)
        y.backward(dy)
        total += expected_wgrad(x.detach(), dy, counts)
        assert p.grad_added_to_main_grad is True
        p.grad_added_to_main_grad = False  # as DDP's zero_grad_buffer would per iteration
        # grad_x is computed as usual
        rx = x.detach().double().requires_grad_(True)
        gmm_reference(rx, w.detach(), counts).backward(dy.double())
        assert (x.grad.double() - rx.grad).abs().max() <= tolerance(dtype, n, rx.grad.abs().max().item())
    mg = view_of(p.main_grad, layout, e, k, n)
    # fp32 accumulation of exact (fp32-computed) products: fp32 error only, whatever the input dtype
    assert (mg.double() - total).abs().max() <= tolerance(torch.float32, 3 * m, total.abs().max().item())
    assert p.grad is not None  # the dummy reached the parameter, as DDP's hook expects


def test_without_ddp_attribute_no_weight_grad_is_returned(backend):
    p = megatron_param((4, 16, 8), torch.float32, ddp_flag=False)
    x = torch.randn(10, 16)
    y = gmm.npu_gmm_v2(x, p, group_list=torch.tensor([1, 2, 3, 4]), gemm_fusion=True, original_weight=p)
    y.sum().backward()
    assert p.grad is None and not hasattr(p, "grad_added_to_main_grad")
    assert torch.allclose(p.main_grad.double(), expected_wgrad(x, torch.ones(10, 8), [1, 2, 3, 4]), atol=1e-4)


def test_zero_out_wgrad_gives_a_zero_dummy(backend):
    p = megatron_param((4, 16, 8), torch.float32)
    p.zero_out_wgrad = True
    y = gmm.npu_gmm_v2(torch.randn(10, 16), p, group_list=torch.tensor([1, 2, 3, 4]), gemm_fusion=True, original_weight=p)
    y.sum().backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


def test_bf16_fused_fp32_accumulation_is_closer_to_float64_than_bf16_grad_plus_add(fp32_products, capsys):
    e, k, n, m, steps = 4, 64, 32, 512, 8
    torch.manual_seed(1)
    fused = megatron_param((e, k, n), torch.bfloat16)
    plain = torch.nn.Parameter(fused.detach().clone())
    plain_main_grad = torch.zeros(e, k, n)
    truth = torch.zeros(e, k, n, dtype=torch.float64)
    counts = torch.tensor([100, 200, 12, 200])
    for _ in range(steps):
        x = torch.randn(m, k).bfloat16()
        dy = torch.randn(m, n).bfloat16()
        gmm.npu_gmm_v2(x, fused, group_list=counts, gemm_fusion=True, original_weight=fused).backward(dy)
        gmm.npu_gmm_v2(x, plain, group_list=counts).backward(dy)
        plain_main_grad += plain.grad.float()  # what DDP does with an unfused bf16 gradient
        plain.grad = None
        truth += expected_wgrad(x, dy, counts.tolist())
    err_fused = ((fused.main_grad.double() - truth).norm() / truth.norm()).item()
    err_plain = ((plain_main_grad.double() - truth).norm() / truth.norm()).item()
    with capsys.disabled():
        print(f"\nbf16 wgrad relative error vs float64 over {steps} micro-batches: "
              f"fused fp32 accumulation {err_fused:.2e}, bf16 grad + add {err_plain:.2e}")
    assert err_fused < err_plain / 10


def test_fusion_errors(backend):
    x = torch.randn(10, 16)
    gl = torch.tensor([1, 2, 3, 4])
    p = torch.nn.Parameter(torch.randn(4, 16, 8))
    with pytest.raises(ValueError, match="original_weight has no main_grad"):
        gmm.npu_gmm_v2(x, p, group_list=gl, gemm_fusion=True, original_weight=p)
    p.main_grad = torch.zeros(4, 16, 7)
    with pytest.raises(ValueError, match=r"main_grad has shape \(4, 16, 7\).*cannot hold"):
        gmm.npu_gmm_v2(x, p, group_list=gl, gemm_fusion=True, original_weight=p)
    p.main_grad = torch.zeros(4, 16, 8)
    other = torch.nn.Parameter(torch.randn(4, 16, 8))
    with pytest.raises(ValueError, match="weight must be a view of original_weight"):
        gmm.npu_gmm_v2(x, other, group_list=gl, gemm_fusion=True, original_weight=p)
    with pytest.raises(ValueError, match="group_type 0 only"):
        gmm.npu_gmm_v2(torch.randn(16, 10), torch.randn(10, 8), group_list=gl, group_type=2,
                       gemm_fusion=True, original_weight=p)
    assert torch.equal(p.main_grad, torch.zeros(4, 16, 8))  # nothing touched by a rejected call


@pytest.fixture
def input_dtype_wgrad():
    with gmm_plugin.settings(backend="torch", fused_wgrad_dtype="input"):
        yield


@pytest.mark.parametrize("use_workers", [False, True])
def test_fused_wgrad_dtype_input_rounds_each_group_once(input_dtype_wgrad, use_workers, monkeypatch):
    """fused_wgrad_dtype "input": each group's gradient comes out of a bf16 GEMM (rounded once)
    and is added into main_grad. More output rows than the fp32 path's block (K > _BLOCK_ROWS),
    an empty group."""
    from gmm_plugin.backends import cpu_workers, torch_backend
    if use_workers:
        # two workers whatever the shapes and thread count (patching torch.get_num_threads instead
        # would reach a pool started here, whose workers' thread setup calls it)
        monkeypatch.setattr(cpu_workers, "usable_workers", lambda *args: 2)
    e, k, n = 3, 2 * torch_backend._BLOCK_ROWS + 37, 24
    counts = [90, 0, 130]
    p = megatron_param((e, k, n), torch.bfloat16)
    truth = torch.zeros(e, k, n, dtype=torch.float64)
    bf16_bound = fp32_bound = 0.0
    for _ in range(3):
        x = torch.randn(sum(counts), k).bfloat16()
        dy = torch.randn(sum(counts), n).bfloat16()
        gmm.npu_gmm_v2(x, p, group_list=counts, gemm_fusion=True, original_weight=p).backward(dy)
        assert p.grad_added_to_main_grad is True
        p.grad_added_to_main_grad = False
        step = expected_wgrad(x, dy, counts)
        truth += step
        bf16_bound += tolerance(torch.bfloat16, max(counts), step.abs().max().item())
        fp32_bound += tolerance(torch.float32, max(counts), step.abs().max().item())
    err = (p.main_grad.double() - truth).abs().max().item()
    assert err <= bf16_bound
    assert err > fp32_bound  # the bf16 rounding happened: this is not the fp32 path
    assert torch.count_nonzero(p.main_grad[1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_wgrad_dtype_input_keeps_fp32_sums_where_the_gemm_is_fp32(input_dtype_wgrad, dtype):
    """fp32 weights, and fp16 on a CPU (computed in fp32 throughout): "input" changes nothing."""
    counts = [7, 0, 20]
    p = megatron_param((3, 16, 8), dtype)
    x = torch.randn(27, 16, dtype=dtype)
    dy = torch.randn(27, 8, dtype=dtype)
    gmm.npu_gmm_v2(x, p, group_list=counts, gemm_fusion=True, original_weight=p).backward(dy)
    truth = expected_wgrad(x, dy, counts)
    assert (p.main_grad.double() - truth).abs().max() <= tolerance(torch.float32, 27, truth.abs().max().item())


def test_set_fused_wgrad_dtype_rejects_other_values():
    with pytest.raises(ValueError, match=r"fused_wgrad_dtype must be one of auto, fp32, input, got 'bf16'"):
        gmm_plugin.set_fused_wgrad_dtype("bf16")


def test_auto_fused_wgrad_dtype_resolves_by_device():
    """auto: fp32 products where the GEMM takes 16-bit operands into fp32 sums (CUDA, Ascend),
    the operands' dtype on a CPU (no such GEMM: fp32 products would run at the fp32 rate)."""
    auto = Settings()
    assert auto.fused_wgrad_dtype == "auto"
    # torch.device("npu") exists only with torch_npu: only .type is read
    devices = [types.SimpleNamespace(type=d) for d in ("cpu", "cuda", "npu")]
    assert [auto.wgrad_dtype_on(d) for d in devices] == ["input", "fp32", "fp32"]
    for explicit in ("fp32", "input"):
        assert Settings(fused_wgrad_dtype=explicit).wgrad_dtype_on(torch.device("cpu")) == explicit


def test_default_fusion_on_a_cpu_is_the_input_dtype_gemm_with_its_stated_accuracy(backend):
    """The default (auto) on a CPU computes each bf16 group's gradient with a bf16 GEMM (rounded
    once) and adds it into the fp32 main_grad: within one bf16 rounding per micro-batch of the
    float64 truth, and bit for bit what fused_wgrad_dtype input gives."""
    e, k, n, counts = 3, 40, 24, [50, 0, 70]
    runs = {}
    for mode in ("auto", "input"):
        torch.manual_seed(3)
        p = megatron_param((e, k, n), torch.bfloat16)
        truth, bound = torch.zeros(e, k, n, dtype=torch.float64), 0.0
        with gmm_plugin.settings(fused_wgrad_dtype=mode):
            for _ in range(2):
                x, dy = torch.randn(sum(counts), k).bfloat16(), torch.randn(sum(counts), n).bfloat16()
                gmm.npu_gmm_v2(x, p, group_list=counts, gemm_fusion=True, original_weight=p).backward(dy)
                step = expected_wgrad(x, dy, counts)
                truth += step
                bound += tolerance(torch.bfloat16, max(counts), step.abs().max().item())
        assert (p.main_grad.double() - truth).abs().max() <= bound
        runs[mode] = p.main_grad
    assert torch.equal(runs["auto"], runs["input"])


def test_ddp_dummy_gradient_is_one_cached_buffer_adopted_without_a_copy(backend):
    """Under Megatron's DDP the fused backward hands autograd a dummy weight gradient. It is the
    same storage every backward (no weight-sized allocation), and AccumulateGrad adopts it as
    .grad without copying (what DDP's hook then drops)."""
    p = megatron_param((4, 16, 8), torch.float32)
    seen = []

    def ddp_like_hook(*_):  # Megatron DDP's post-accumulate hook, reduced to what matters here
        seen.append(p.grad)  # kept alive: a fresh allocation could not reuse its memory
        p.grad = None
    p.register_post_accumulate_grad_hook(ddp_like_hook)
    for _ in range(3):
        x = torch.randn(10, 16)
        gmm.npu_gmm_v2(x, p, group_list=[1, 2, 3, 4], gemm_fusion=True, original_weight=p).sum().backward()
    ptrs = {g.untyped_storage().data_ptr() for g in seen}
    assert len(seen) == 3 and len(ptrs) == 1
    other = megatron_param((4, 16, 8), torch.float32)
    gmm.npu_gmm_v2(torch.randn(10, 16), other, group_list=[1, 2, 3, 4], gemm_fusion=True,
                   original_weight=other).sum().backward()
    assert other.grad.untyped_storage().data_ptr() in ptrs  # one buffer per shape and dtype


def test_cached_zero_dummy_is_zero_every_time(backend):
    p = megatron_param((4, 16, 8), torch.float32)
    p.zero_out_wgrad = True
    for _ in range(2):
        gmm.npu_gmm_v2(torch.randn(10, 16), p, group_list=[1, 2, 3, 4], gemm_fusion=True,
                       original_weight=p).sum().backward()
        assert torch.equal(p.grad, torch.zeros_like(p))
        p.grad.fill_(5.0)  # someone writes into the adopted dummy: the next one is still zero
        p.grad = None

