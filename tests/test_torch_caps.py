"""gmm_plugin.torch_caps and its callers: what differs between the torch builds the plugin runs on
(2.1 to 2.13) is asked of torch, and the callers take the path torch can run.

The older torch behaviours are reproduced on the installed torch by replacing the one function
that differs with one that behaves as that build's does (torch 2.8's `_grouped_mm` without a CPU
kernel, torch 2.1's argument-less `is_autocast_enabled`, torch 2.1's `cpp_extension.load` that
returns None). docs/torch-versions.md has the suites run on the real builds.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gmm_plugin import npu_gmm_v2, torch_caps
from gmm_plugin.backends import cpu_workers
from reference import EPS, gmm_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def fresh_caps():
    """Probes re-asked in the test and after it (their answers depend on what the test replaced)."""
    probes = (torch_caps.cpu_grouped_mm, torch_caps._autocast_query, torch_caps.cpu_mm)
    for p in probes:
        p.cache_clear()
    yield torch_caps
    for p in probes:
        p.cache_clear()


def _runs(fn) -> bool:
    try:
        fn()
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_grouped_mm_probe_says_what_the_op_does(dtype, fresh_caps):
    offs = torch.tensor([16, 32], dtype=torch.int32)
    x, w = torch.ones(32, 16, dtype=dtype), torch.ones(2, 16, 16, dtype=dtype)
    works = hasattr(torch, "_grouped_mm") and _runs(lambda: torch._grouped_mm(x, w, offs))
    assert torch_caps.cpu_grouped_mm(dtype) is works
    assert torch_caps.grouped_mm(torch.device("cpu"), dtype) is works


def test_probes_are_not_decided_by_a_mode_active_at_the_first_call(fresh_caps):
    # Under a FakeTensorMode torch 2.13's meta kernel of _grouped_mm refuses fp32: a probe run
    # inside it would cache False for the real CPU kernel, which works.
    expected = torch_caps.cpu_grouped_mm(torch.float32)
    torch_caps.cpu_grouped_mm.cache_clear()
    with FakeTensorMode():
        assert torch_caps.cpu_grouped_mm(torch.float32) is expected
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_caps.cpu_grouped_mm.cache_clear()
        assert torch_caps.cpu_grouped_mm(torch.float32) is expected


def _no_cpu_kernel(*args, **kwargs):
    # torch 2.8.0's message for every CPU call of the op (reference/torch-versions.md, cause 1)
    raise NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'CPU' backend.")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_default_cpu_path_where_grouped_mm_has_no_cpu_kernel(dtype, monkeypatch, fresh_caps):
    """torch 2.8: the op exists without a CPU kernel. The default path (auto -> torch on a CPU)
    loops instead; the old `hasattr` check called it and raised NotImplementedError."""
    monkeypatch.setattr(torch, "_grouped_mm", _no_cpu_kernel, raising=False)
    counts = [3, 0, 5, 8]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g).to(dtype).requires_grad_()
    w = torch.randn(4, 32, 16, generator=g).to(dtype).requires_grad_()
    y = npu_gmm_v2(x, w, group_list=counts)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = gmm_reference(xr, wr, counts)
    yr.backward(dy.double())
    # fp32 accumulation over K=32 (M=16 for the weight gradient), one rounding to dtype at the end
    for got, want in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        tol = 2 * EPS[dtype] * want.abs().max().item() + 64 * EPS[torch.float32] * 32
        assert (got.double() - want).abs().max().item() <= tol
    assert not torch_caps.cpu_grouped_mm(dtype)


def test_autocast_query_on_a_torch_without_the_device_argument(monkeypatch, fresh_caps):
    """torch 2.1: torch.is_autocast_enabled() takes no argument (it means CUDA) and the CPU has
    torch.is_autocast_cpu_enabled(). The worker pool's check used to raise TypeError there on
    every large enough product under no_grad and in backward."""
    real = torch.is_autocast_enabled

    def cuda_only(*args):
        # torch's own autocast context manager (2.13's) calls it with the argument: only the
        # plugin's calls see the old signature
        if args and sys._getframe(1).f_globals.get("__name__", "").startswith("gmm_plugin"):
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return real("cuda")

    try:
        real("cpu")
    except TypeError:
        pass  # this torch has the old signature itself (2.1-2.3): test it as it is
    else:
        monkeypatch.setattr(torch, "is_autocast_enabled", cuda_only)
        monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: real("cpu"), raising=False)
    x = torch.zeros(2, 2)
    big = (cpu_workers.MIN_FLOPS, 64, cpu_workers.MIN_GROUP_CELLS)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            assert cpu_workers.usable_workers(*big, x) == (2 if (os.cpu_count() or 1) >= 2 else 0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch_caps.autocast_enabled("cpu")
                assert cpu_workers.usable_workers(*big, x) == 0  # workers would not see autocast
        assert not torch_caps.autocast_enabled("cpu") and not torch_caps.autocast_enabled("cuda")
    finally:
        torch.set_num_threads(threads)


def test_cpu_mm_probe(fresh_caps):
    for dtype in DTYPES:
        works = _runs(lambda: torch.mm(torch.ones(4, 4, dtype=dtype), torch.ones(4, 4, dtype=dtype)))
        assert torch_caps.cpu_mm(dtype) is works


def test_jit_decorates_methods():
    assert torch_caps.jit_decorates_methods(lambda fn: fn)
    assert torch_caps.jit_decorates_methods(torch.compile)
    assert not torch_caps.jit_decorates_methods(torch.jit.script)  # what megatron-core 0.12 picks on torch < 2.2


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "c++")), reason="needs a C++ compiler")
def test_aclnn_build_found_where_cpp_extension_load_returns_none(tmp_path, monkeypatch):
    """torch 2.1.2's cpp_extension.load(is_python_module=False) loads the library and returns None.
    A second build in a process (another build directory) gets a _v1 name, which the old fallback
    (`<dir>/gmm_plugin_aclnn.so`) missed: ctypes raised OSError."""
    pytest.importorskip("ninja")
    from torch.utils import cpp_extension

    from gmm_plugin.backends import aclnn
    real = cpp_extension.load

    def load_returning_none(*args, **kwargs):
        real(*args, **kwargs)
        return None

    monkeypatch.setattr(cpp_extension, "load", load_returning_none)
    try:
        for name in ("first", "second"):
            monkeypatch.setenv(aclnn.BUILD_DIR_ENV, str(tmp_path / name))
            aclnn._compiled.cache_clear()
            lib = aclnn._compiled()
            assert os.path.dirname(lib._name) == str(tmp_path / name) and os.path.isfile(lib._name)
            assert lib.gmm_aclnn_open is not None
    finally:
        aclnn._compiled.cache_clear()
