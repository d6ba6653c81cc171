"""What the installed torch can do, asked of torch itself once per process (cached).

gmm-plugin runs on torch 2.1 to 2.13 (the builds torch_npu releases pair with). What differs
between them is probed here, not read from version strings: a version says nothing about a build
that lacks a kernel (torch 2.8 has `torch._grouped_mm` with no CPU kernel), and a probe stays
right for builds and backports no table lists.
"""
from __future__ import annotations

import functools

import torch


def _untraced(fn):
    """Run a probe eagerly on plain tensors: with no dispatch or function mode (a FakeTensorMode
    or a TorchFunctionMode active at the first call must not decide the cached answer), no autocast
    and no autograd recording."""
    from torch.utils._python_dispatch import _disable_current_modes

    @functools.wraps(fn)
    def probe(*args):
        with _disable_current_modes(), torch._C.DisableTorchFunction(), \
                torch.autocast("cpu", enabled=False), torch.no_grad():
            return fn(*args)
    return probe


@functools.lru_cache(maxsize=None)
@_untraced
def cpu_grouped_mm(dtype: torch.dtype) -> bool:
    """torch._grouped_mm runs on CPU tensors of this dtype and gets the right answer, in both
    layouts the plugin uses: (M,K) x (E,K,N) grouped over M, and (K,M) x (M,N) grouped over M.

    False before torch 2.8 (no such op) and on 2.8 (the op has no CPU kernel: NotImplementedError).
    """
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    # 16 columns: every row stride is a multiple of 16 bytes, as the op demands, for 1-byte dtypes too.
    offs = torch.tensor([3, 8], dtype=torch.int32)
    x = torch.arange(8 * 16).reshape(8, 16).remainder(3).to(dtype)
    w = torch.arange(2 * 16 * 16).reshape(2, 16, 16).remainder(5).to(dtype)
    try:
        y = fn(x, w, offs)
        dw = fn(x.t(), x, offs)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    xd = x.double()
    want_y = torch.cat([xd[:3] @ w[0].double(), xd[3:] @ w[1].double()])
    want_dw = torch.stack([xd[:3].t() @ xd[:3], xd[3:].t() @ xd[3:]])
    # Small integers: exact in every float dtype the op takes.
    return torch.equal(y.double(), want_y) and torch.equal(dw.double(), want_dw)


@functools.lru_cache(maxsize=None)
def _autocast_query():
    """torch.is_autocast_enabled(device_type) where this torch takes the argument (2.4+); before,
    one function per device type (torch.is_autocast_cpu_enabled, torch.is_autocast_enabled for CUDA)."""
    try:
        torch.is_autocast_enabled("cpu")
        return torch.is_autocast_enabled
    except TypeError:
        pass

    def per_device(device_type: str) -> bool:
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        query = getattr(torch, f"is_autocast_{device_type}_enabled", None)
        return bool(query()) if query is not None else False
    return per_device


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type ("cpu", "cuda", ...) in this thread."""
    return _autocast_query()(device_type)


@functools.lru_cache(maxsize=None)
@_untraced
def cpu_mm(dtype: torch.dtype) -> bool:
    """A dense torch.mm runs on CPU tensors of this dtype (torch 2.1's CPU has no fp16 GEMM)."""
    try:
        torch.mm(torch.ones(2, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype))
    except RuntimeError:
        return False
    return True


def grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm can be called for tensors of this device and dtype: probed on a CPU;
    elsewhere its presence (which CUDA cases it runs natively is torch_backend's choice)."""
    if device.type == "cpu":
        return cpu_grouped_mm(dtype)
    return hasattr(torch, "_grouped_mm")


class _WithEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.eps = 1e-5

    def forward(self, x):
        return x + self.eps


@functools.lru_cache(maxsize=None)
def jit_decorates_methods(decorator) -> bool:
    """`decorator` (a JIT such as Megatron's jit_fuser) can be applied to what Megatron applies it
    to: a module method that reads an attribute of self (L2Norm.forward's self.eps) and a closure
    over an object (GroupedMLP's activation closures). torch.jit.script cannot: it compiles at
    decoration time and types an unannotated self as a Tensor. torch.compile defers, so it can."""
    probe = _WithEps()

    def closure(x):
        return x * probe.eps

    try:
        decorator(_WithEps.forward)
        decorator(closure)
    except Exception:  # TorchScript's frontend raises RuntimeError, NotSupportedError, ...
        return False
    return True
