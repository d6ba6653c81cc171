"""The torch backend's CUDA-only code, run on this CPU where that can be done honestly (issue 21
item 9, issue 20's CUDA fused form). Nothing here ran on a GPU: this project's sessions have none.

- The empty-group guard (`_zero_empty_groups`) is the same function on any device: it runs here
  on CPU tensors, from device-form counts, under the host-read counter.
- Its call sites are CUDA-only by a device list (`_SPLIT_K_TRUSTED`, `_GROUPED_ACCUMULATE`); the
  tests move the CPU off that list and put in torch._grouped_mm's place a stand-in that behaves as
  pytorch issue #172439 reports for SM100 (non-zero values, here NaN, in the empty groups' slices).
- The fp32 fused form on CUDA (`torch.addmm(..., out_dtype=)`) is chosen by a probe; the probe is
  asked here of the CPU (no such kernel), of fakes of older torch's two refusals, and of torch's
  own meta kernel (which checks the call's form, not values); the fallback form every torch takes
  runs here with the dtypes CUDA would give it (bf16 operands, fp32 main_grad).
"""
from __future__ import annotations

import pytest
import torch

from gmm_plugin.backends import get_backend, torch_backend as tb
from gmm_plugin.group_list import Groups, make_groups
from sync_counter import count_host_reads

COUNTS = [3, 0, 5, 0]


def _device_groups(counts):
    """Groups from a group_list that lives on the compute device (no host copy of the sizes)."""
    return Groups(False, torch.tensor(counts, device="cpu"), sum(counts))


def test_empty_groups_are_zeroed_on_the_device_without_a_host_read():
    r = torch.randn(4, 3, 5)
    r[1] = float("nan")  # what a kernel may leave there
    r[3] = 7.0
    kept = r[[0, 2]].clone()
    groups = _device_groups(COUNTS)
    with count_host_reads() as reads:
        out = tb._zero_empty_groups(r, groups)
    assert reads.total == 0, reads.report()
    assert out is r  # in place: no second [E, P, N] tensor
    assert torch.equal(r[[1, 3]], torch.zeros(2, 3, 5)) and torch.equal(r[[0, 2]], kept)


def _sm100_like_grouped_mm(real):
    """torch._grouped_mm as pytorch issue #172439 reports it on SM100: right where a group has
    rows, garbage (NaN here) in an empty group's slice of the split-K (weight-gradient) result."""
    def fake(a, b, offs, *args, **kwargs):
        r = real(a, b, offs, *args, **kwargs)
        if r.dim() == 3:
            ends = offs.tolist()
            starts = [0] + ends[:-1]
            for e, (s, t) in enumerate(zip(starts, ends)):
                if s == t:
                    r[e] = float("nan")
        return r
    return fake


@pytest.fixture
def untrusted_cpu(monkeypatch):
    """The CPU treated as CUDA is: split-K results guarded, the fused backward's grouped form."""
    if not hasattr(torch, "_grouped_mm") or not tb._grouped_mm_ok(torch.zeros(8, 16), torch.zeros(16, 8)):
        pytest.skip("this torch has no CPU torch._grouped_mm for these operands")
    monkeypatch.setattr(torch, "_grouped_mm", _sm100_like_grouped_mm(torch._grouped_mm))
    monkeypatch.setattr(tb, "_SPLIT_K_TRUSTED", ())
    monkeypatch.setattr(tb, "_GROUPED_ACCUMULATE", ("cpu",))
    monkeypatch.setattr(tb.cpu_workers, "usable_workers", lambda *a, **k: 0)  # the single-call path


def _expected(a, b, counts):
    out, s = [], 0
    for c in counts:
        out.append(a[:, s:s + c].double() @ b[s:s + c].double())
        s += c
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_products_of_empty_groups_are_zero(untrusted_cpu, dtype):
    a, b = torch.randn(16, 8).to(dtype), torch.randn(8, 16).to(dtype)
    groups = make_groups(COUNTS, cumsum=False, total=8, device=a.device, axis="M")
    r = get_backend("torch").grouped_mm_k(a, b, groups)
    assert torch.equal(r[[1, 3]].float(), torch.zeros(2, 16, 16))  # 39daed2: NaN
    assert torch.allclose(r.double(), _expected(a, b, COUNTS), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                          atol=1e-1 if dtype == torch.bfloat16 else 1e-4)


def test_the_fused_grouped_accumulate_adds_nothing_for_empty_groups(untrusted_cpu):
    a, b = torch.randn(16, 8).bfloat16(), torch.randn(8, 16).bfloat16()
    main_grad = torch.ones(4, 16, 16)
    groups = make_groups(COUNTS, cumsum=False, total=8, device=a.device, axis="M")
    get_backend("torch").accumulate_k(main_grad, a, b, groups, wgrad_dtype="input")
    assert torch.equal(main_grad[[1, 3]], torch.ones(2, 16, 16))  # 39daed2 added the NaN in
    want = 1 + _expected(a, b, COUNTS)
    assert torch.allclose(main_grad[[0, 2]].double(), want[[0, 2]], rtol=2e-2, atol=1e-1)  # bf16 products


# ---- the fp32 fused form: asked of torch, with a form every torch takes where it says no -------

def test_the_mixed_dtype_addmm_probe():
    tb._mixed_addmm_ok.cache_clear()
    # No CPU kernel for addmm's out_dtype overload (torch 2.13): the CPU is never sent there.
    assert tb._mixed_addmm_ok(torch.device("cpu"), torch.bfloat16, torch.float32) is False
    if "out_dtype" in str(torch.addmm.__doc__) or hasattr(torch.ops.aten.addmm, "dtype_out"):
        # torch's own meta kernel accepts the exact call CUDA gets (shapes and argument form only)
        assert tb._mixed_addmm_ok(torch.device("meta"), torch.bfloat16, torch.float32) is True


@pytest.mark.parametrize("refusal", [
    TypeError("addmm() received an invalid combination of arguments - got (..., out_dtype=torch.dtype, out=Tensor)"),
    RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16"),
], ids=["torch_before_2.8", "before_pr_167931"])
def test_the_probe_says_no_where_older_torch_refuses(monkeypatch, refusal):
    """How torch < 2.8 (no out_dtype argument) and CUDA before pytorch PR #167931 (self must
    have mat2's dtype) answer, put in torch.addmm's place on the meta device (which says yes)."""
    tb._mixed_addmm_ok.cache_clear()
    real = torch.addmm

    def older(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise refusal
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "addmm", older)
    try:
        assert tb._mixed_addmm_ok(torch.device("meta"), torch.bfloat16, torch.float32) is False
        # ... and the fused fp32 accumulation then takes the form every torch has (no raise)
        out = torch.zeros(16, 16, device="meta")
        tb._accumulate(out, torch.zeros(16, 600, dtype=torch.bfloat16, device="meta"),
                       torch.zeros(600, 16, dtype=torch.bfloat16, device="meta"), 0, 600, "fp32")
    finally:
        tb._mixed_addmm_ok.cache_clear()


def test_the_fallback_fp32_form_with_cuda_dtypes():
    """bf16 operands, fp32 main_grad, fp32 products: the form any torch takes, values checked."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 700, generator=g).bfloat16()  # 700 rows: three blocks of _BLOCK_ROWS
    b = torch.randn(700, 12, generator=g).bfloat16()
    out = torch.ones(16, 12)
    tb._accumulate(out, a, b, 50, 650, "fp32")
    want = 1 + a[:, 50:650].double() @ b[50:650].double()
    assert (out.double() - want).abs().max() <= 600 ** 0.5 * 2.0 ** -20 * want.abs().max()  # fp32 sums
