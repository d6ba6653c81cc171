"""The operator library's runtime settings: one immutable value, owned here and nowhere else.

    gmm_plugin.settings.configure(backend="torch")      # process-wide; returns the previous value
    with gmm_plugin.settings(fused_wgrad_dtype="fp32"):  # for a block (this thread / task only)
        y = npu_gmm_v2(x, w, group_list=counts)

Every npu_gmm call captures `current()` when it runs, and its backward uses that same value,
whatever is in effect when autograd gets to it (backward may run on another thread, outside the
block). Until configure() is called the process-wide value is the defaults overlaid with the
GMM_PLUGIN_* environment (read once, on first use; reset() reads it again).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
import types

import torch

from .backends import NAMES as BACKENDS

FUSED_WGRAD_DTYPES = ("auto", "fp32", "input")
# Devices whose GEMMs take 16-bit operands and sum and write fp32 (cuBLAS, Ascend's GroupedMatmulAdd):
# there `auto` keeps fp32 products. A CPU has no such GEMM, so `auto` means "input" there.
_MIXED_PRECISION_GEMM = ("cuda", "npu")


@dataclasses.dataclass(frozen=True)
class Settings:
    """backend: auto (by device) | reference | torch | npu | aclnn.
    check_group_list: check a group_list that lives only on an accelerator, on that device,
        where the device has an asynchronous assert (host group_lists are always checked).
    fused_wgrad_dtype: how gemm_fusion computes a 16-bit expert's weight gradient before it is
        added into the fp32 main_grad: fp32 (fp32 products and sums, as Ascend's GroupedMatmulAdd),
        input (a GEMM in the operands' dtype, each group's gradient rounded once, then the add:
        Megatron's unfused accuracy) or auto (fp32 where the device has a mixed-precision GEMM,
        input on a CPU)."""
    backend: str = "auto"
    check_group_list: bool = True
    fused_wgrad_dtype: str = "auto"

    def __post_init__(self):
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("fused_wgrad_dtype", self.fused_wgrad_dtype, FUSED_WGRAD_DTYPES)
        if not isinstance(self.check_group_list, bool):
            raise TypeError(f"check_group_list must be a bool, got {type(self.check_group_list).__name__}.")

    def wgrad_dtype_on(self, device: torch.device) -> str:
        """fused_wgrad_dtype with `auto` resolved for a device: 'fp32' or 'input'."""
        if self.fused_wgrad_dtype != "auto":
            return self.fused_wgrad_dtype
        return "fp32" if device.type in _MIXED_PRECISION_GEMM else "input"


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")


_process: Settings | None = None  # None: not configured yet (defaults < environment, on first use)
_block: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("gmm_plugin_settings", default=None)


def _from_environment() -> Settings:
    from .config import load_config  # config imports this module: resolve at call time
    return load_config(None).settings()


def current() -> Settings:
    """The settings in effect here: the innermost `with settings(...)` block, else process-wide."""
    global _process
    block = _block.get()
    if block is not None:
        return block
    if _process is None:
        _process = _from_environment()
    return _process


def configure(value: Settings | None = None, **changes) -> Settings:
    """Set the process-wide settings (value, and/or changes to the current process-wide value).
    Returns the previous value: `prev = configure(...)` ... `configure(prev)` restores it."""
    global _process
    previous = _process if _process is not None else _from_environment()
    base = previous if value is None else value
    if not isinstance(base, Settings):
        raise TypeError(f"configure() takes a Settings value, got {type(base).__name__}.")
    _process = dataclasses.replace(base, **changes)
    return previous


def reset() -> None:
    """Forget configure(): back to the defaults overlaid with the GMM_PLUGIN_* environment."""
    global _process
    _process = None


@contextlib.contextmanager
def override(**changes):
    """Settings for a block: `with gmm_plugin.settings(backend="reference"): ...`."""
    token = _block.set(dataclasses.replace(current(), **changes))
    try:
        yield _block.get()
    finally:
        _block.reset(token)


# Thin wrappers kept for the public API of earlier releases.
def set_backend(name: str | None) -> None:
    """Force a backend for every call ('auto' or None: choose by device)."""
    configure(backend="auto" if name is None else name)


def set_fused_wgrad_dtype(dtype: str) -> None:
    configure(fused_wgrad_dtype=dtype)


def set_device_group_list_checks(enabled: bool) -> None:
    configure(check_group_list=bool(enabled))


class _CallableModule(types.ModuleType):
    # `gmm_plugin.settings` is both this module and the block context manager:
    # `with gmm_plugin.settings(backend="torch"):` and `gmm_plugin.settings.configure(...)`.
    def __call__(self, **changes):
        return override(**changes)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Settings", "FUSED_WGRAD_DTYPES", "current", "configure", "reset", "override",
           "set_backend", "set_fused_wgrad_dtype", "set_device_group_list_checks"]
