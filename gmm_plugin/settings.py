"""The operator library's runtime settings: one immutable value, owned here and nowhere else.

    gmm_plugin.settings.configure(backend="torch")      # process-wide; returns the previous value
    with gmm_plugin.settings(fused_wgrad_dtype="fp32"):  # for a block (this thread / task only)
        y = npu_gmm_v2(x, w, group_list=counts)

Every npu_gmm call captures `current()` when it runs, and its backward uses that same value,
whatever is in effect when autograd gets to it (backward may run on another thread, outside the
block). Until configure() is called the process-wide value is the defaults overlaid with the
GMM_PLUGIN_* environment (read once, on first use; reset() reads it again). This module reads its
own three variables (ENV_VARS) and nothing else of the environment or the config.

Activation recomputation re-runs a region's forward later, outside the block, and on CUDA/NPU on
autograd's device thread, where the block's context variable is not set: torch's and Megatron's
checkpoints restore the RNG (and torch's autocast) state, not ours. So the settings travel with the
region: from the first configure() or block on, the checkpoint functions that re-run a function
(torch.utils.checkpoint, both modes; Megatron's CheckpointFunction and CheckpointWithoutOutput)
get that function bound to the settings in effect where checkpoint() was called, and run it, in
the forward and in each recomputation, under them. A block inside the region still applies inside
it; a configure() made inside the region does not (the region keeps the value it started with).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import os
import sys
import threading
import types

import torch

from .backends import NAMES as BACKENDS

FUSED_WGRAD_DTYPES = ("auto", "fp32", "input")
# The environment variables of the settings, the only ones this module reads.
ENV_VARS = {"backend": "GMM_PLUGIN_BACKEND", "check_group_list": "GMM_PLUGIN_CHECK_GROUP_LIST",
            "fused_wgrad_dtype": "GMM_PLUGIN_FUSED_WGRAD_DTYPE"}
CHOICES = {"backend": BACKENDS, "fused_wgrad_dtype": FUSED_WGRAD_DTYPES}
TRUE_STRINGS = ("1", "true", "yes", "on")
FALSE_STRINGS = ("0", "false", "no", "off")
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


class SettingsError(ValueError):
    """A bad value for a setting read from a string; the message names where it came from."""


def parse_choice(value: str, choices, where: str, label: str, error=SettingsError) -> str:
    """value (any case, spaces around) as one of choices, else error naming where and label."""
    norm = value.strip().lower()
    if norm not in choices:
        close = difflib.get_close_matches(norm, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise error(f"{where}: key '{label}' must be one of {', '.join(choices)}, got {value!r}{hint}.")
    return norm


def parse_bool(value: str, where: str, label: str, error=SettingsError) -> bool:
    norm = value.strip().lower()
    if norm in TRUE_STRINGS:
        return True
    if norm in FALSE_STRINGS:
        return False
    raise error(f"{where}: key '{label}' must be a boolean ({'/'.join(TRUE_STRINGS)} or "
                f"{'/'.join(FALSE_STRINGS)}), got {value!r}.")


def parse(key: str, value: str, where: str, error=SettingsError):
    """One setting from a string (an environment variable): its choice, or a boolean."""
    if key in CHOICES:
        return parse_choice(value, CHOICES[key], where, key, error)
    return parse_bool(value, where, key, error)


def from_environment(env=None) -> Settings:
    """The defaults overlaid with the settings' own GMM_PLUGIN_* variables (env: os.environ)."""
    env = os.environ if env is None else env
    values = {}
    for key, var in ENV_VARS.items():
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            values[key] = parse(key, raw, f"environment variable {var}")
    return Settings(**values)


_process: Settings | None = None  # None: not configured yet (defaults < environment, on first use)
_block: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("gmm_plugin_settings", default=None)


def current() -> Settings:
    """The settings in effect here: the innermost `with settings(...)` block, else process-wide."""
    global _process
    block = _block.get()
    if block is not None:
        return block
    if _process is None:
        _process = from_environment()
    return _process


def configure(value: Settings | None = None, **changes) -> Settings:
    """Set the process-wide settings (value, and/or changes to the current process-wide value).
    Returns the previous value: `prev = configure(...)` ... `configure(prev)` restores it."""
    global _process
    previous = _process if _process is not None else from_environment()
    base = previous if value is None else value
    if not isinstance(base, Settings):
        raise TypeError(f"configure() takes a Settings value, got {type(base).__name__}.")
    _process = dataclasses.replace(base, **changes)
    _carry_into_recomputation()
    return previous


def reset() -> None:
    """Forget configure(): back to the defaults overlaid with the GMM_PLUGIN_* environment."""
    global _process
    _process = None


@contextlib.contextmanager
def override(**changes):
    """Settings for a block: `with gmm_plugin.settings(backend="reference"): ...`."""
    value = dataclasses.replace(current(), **changes)
    _carry_into_recomputation()
    token = _block.set(value)
    try:
        yield value
    finally:
        _block.reset(token)


def bound(fn, value: Settings | None = None):
    """fn, run under `value` (default: the settings in effect now) wherever and whenever it is
    called: on another thread, or after the block has ended."""
    value = current() if value is None else value

    @functools.wraps(fn)
    def run(*args, **kwargs):
        token = _block.set(value)
        try:
            return fn(*args, **kwargs)
        finally:
            _block.reset(token)
    run.__gmm_plugin_settings__ = value
    return run


# The checkpoint functions that keep a function to re-run: (module, attribute, position of that
# function among the arguments). A module not imported yet is looked at again on the next
# configure() or block.
_RECOMPUTING = (
    ("torch.utils.checkpoint", "CheckpointFunction.forward", 1),  # reentrant: (ctx, run_function, ...)
    ("torch.utils.checkpoint", "_checkpoint_without_reentrant_generator", 0),  # (fn, ...)
    ("megatron.core.tensor_parallel.random", "CheckpointFunction.forward", 1),
    ("megatron.core.tensor_parallel.random", "CheckpointWithoutOutput.checkpoint", 1),  # (self, fn, ...)
)
_carried: set[tuple[str, str]] = set()
_carry_lock = threading.Lock()


def _binding_argument(original, position: int):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if len(args) > position:
            args = args[:position] + (bound(args[position]),) + args[position + 1:]
        return original(*args, **kwargs)
    wrapper.__gmm_plugin_original__ = original
    return wrapper


def _carry_into_recomputation() -> None:
    """Bind the function each checkpoint re-runs to the settings where checkpoint() was called."""
    if len(_carried) == len(_RECOMPUTING):
        return
    import torch.utils.checkpoint  # noqa: F401  (part of torch; imported here so it is carried now)
    with _carry_lock:
        for module_name, path, position in _RECOMPUTING:
            module = sys.modules.get(module_name)
            if (module_name, path) in _carried or module is None:
                continue
            *owner_path, name = path.split(".")
            owner = module
            for part in owner_path:
                owner = getattr(owner, part, None)
            raw = None if owner is None else owner.__dict__.get(name)
            if raw is None:  # not in this version: nothing to carry there
                _carried.add((module_name, path))
                continue
            static = isinstance(raw, staticmethod)
            func = raw.__func__ if static else raw
            if not hasattr(func, "__gmm_plugin_original__"):
                wrapper = _binding_argument(func, position)
                setattr(owner, name, staticmethod(wrapper) if static else wrapper)
            _carried.add((module_name, path))


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

__all__ = ["Settings", "SettingsError", "FUSED_WGRAD_DTYPES", "ENV_VARS", "current", "configure", "reset",
           "override", "bound", "from_environment", "parse",
           "set_backend", "set_fused_wgrad_dtype", "set_device_group_list_checks"]
