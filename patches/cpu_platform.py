"""Run Megatron-core's MoE training path on a CPU (gloo), with no accelerator.

Megatron-core calls `torch.cuda` in a few places on that path even when every tensor is on the
CPU (reference/cpu-probe.md §2.3, §2.5): it allocates on `torch.cuda.current_device()`, creates
side streams and events (alltoall dispatcher, DDP), seeds and forks "CUDA" RNG states
(`model_parallel_cuda_manual_seed`, the RNG tracker), synchronizes, and checks the compute
capability when `--moe-grouped-gemm` is validated. This shim makes those calls mean "the CPU":

  torch.cuda.current_device()                     -> "cpu"
  torch.cuda.Stream / Event / current_stream /
  default_stream / stream(s) / synchronize        -> no-op stand-ins (CPU work is synchronous)
  torch.cuda.get/set_rng_state, manual_seed(_all)
  and Megatron's _get/_set_cuda_rng_state         -> the CPU default generator (the "device"
                                                     generator of a CPU run, so dropout inside
                                                     the RNG tracker's fork() uses its state)
  torch.cuda.get_device_capability()              -> (9, 0) (as MindSpeed does on NPUs)
  Megatron's hard-coded device="cuda" causal masks -> CPU masks
  moe_utils.maybe_move_tensor_to_cpu(as_numpy=True) -> numpy for CPU tensors too (EP alltoall splits)

`torch.cuda.is_available()` stays False. enable() is idempotent and does nothing when an
accelerator is present; disable() puts back every original object.

One more CPU-only matter: glibc hands every block above its mmap threshold (at most 32 MB) back
to the kernel on free, so each training step page-faults its large buffers in again (measured:
0.1-0.2 ms per MB on this project's machine, 5-10 % of a bf16 MoE layer step, most for grouped
experts, whose buffers are stacked). While the shim is on, glibc keeps freed memory for reuse
(mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD 2 GiB), as GPU caching allocators do; disable() puts
back the values the process started with (its start-up GLIBC_TUNABLES / MALLOC_*_ variables, else
glibc's defaults: glibc has no getter, and values set by other code's mallopt calls are not known)
and returns what it kept (malloc_trim; glibc's dynamic threshold then stays off). Other C
libraries: untouched.

enable_training() adds what Megatron-LM's training loop (`megatron.training`: initialize_megatron,
pretrain, its checkpointing) needs on top (reference/megatron-lm-cpu.md rows 1-3, 8, 10):

  initialize_megatron(...)                        -> allow_no_cuda=True, and while it runs
                                                     torch.cuda.device_count() == 1 and set_device a
                                                     no-op (else it skips the model-parallel groups
                                                     and the RNG tracker seeds)
  megatron.legacy.fused_kernels.load              -> no-op (it would run nvcc; it builds nothing now)
  literal device='cuda', .cuda(), grad.type()     -> the CPU, process-wide (cuda_literals_on_cpu)
  typing.override (Python < 3.12, 0.19's code)    -> PEP 698's decorator (also in processes Megatron
                                                     spawns: examples/megatron_lm_launch.py)
  build_pretraining_data_loader(...)              -> the same DataLoader, with a generator of its own

Why the last one: the shim's "CUDA" generator is the CPU default generator (CPU dropout can draw
from no other), and a DataLoader without a generator draws its workers' base seed from that same
generator each time an iterator is made. On a GPU that draw moves only the host's generator; on a
CPU run it moved the dropout stream, so a run resumed from a checkpoint (iterator made after the
load) diverged from an uninterrupted one. With a generator of its own the draw touches no stream
the model uses.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import inspect
import logging
import os
import sys
import typing

import torch

from gmm_plugin import torch_caps

from ._patching import PatchSet, define_missing_te_general_gemm

__all__ = ["enable", "disable", "is_enabled", "accelerator_present", "cuda_literals_on_cpu",
           "enable_training", "training_enabled", "ensure_typing_override"]

_patches = PatchSet()
_enabled = False
_RNG_LOGGER = "megatron.core.tensor_parallel.random"


def accelerator_present() -> bool:
    """True when a CUDA GPU or an Ascend NPU is usable: the shim must then stay off."""
    if torch.cuda.is_available():
        return True
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:  # a half-installed torch_npu: treat as absent
        return False


class _Event:
    """torch.cuda.Event stand-in: CPU work is already complete when the call returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _Stream:
    """torch.cuda.Stream stand-in."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_CURRENT_STREAM = _Stream()


def _current_device():
    return "cpu"


def _current_stream(device=None):
    return _CURRENT_STREAM


def _stream(stream=None):
    return contextlib.nullcontext(stream)


def _synchronize(device=None):
    pass


def _get_device_capability(device=None):
    return (9, 0)


def _get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _manual_seed(seed):
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which is us.
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _megatron_set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _default_causal_mask(sq):
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _sliding_window_causal_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool)
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    # The alltoall dispatcher expects its split sizes as host numpy arrays after this call (what the
    # GPU path returns); Megatron's version converts only CUDA tensors, and gloo's
    # all_to_all_single rejects the tensors it leaves behind on a CPU run.
    if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
        return tensor.numpy()
    return tensor


# Megatron functions that hard-code device="cuda" (or CUDA-only RNG calls) on the training path.
_MEGATRON_FUNCS = {
    "megatron.core.tensor_parallel.random": {"_get_cuda_rng_state": _megatron_get_cuda_rng_state,
                                             "_set_cuda_rng_state": _megatron_set_cuda_rng_state},
    # Used when the attention mask is None (pretrain_gpt without dataloader masks).
    "megatron.core.transformer.utils": {"get_default_causal_mask": _default_causal_mask,
                                        "get_sliding_window_causal_mask": _sliding_window_causal_mask},
    "megatron.core.transformer.moe.moe_utils": {"maybe_move_tensor_to_cpu": _maybe_move_tensor_to_cpu},
}


class _DropCpuRngWarning(logging.Filter):
    # The tracker's fork() warns when the CPU state moves inside it; on a CPU run that is the point.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_RNG_FILTER = _DropCpuRngWarning()


def is_enabled() -> bool:
    return _enabled


def enable(force: bool = False) -> bool:
    """Install the shim. Returns True when it is active after the call.

    With an accelerator present it does nothing and returns False, unless force=True.
    """
    global _enabled
    if _enabled:
        return True
    if accelerator_present() and not force:
        return False
    cuda = torch.cuda
    try:
        for owner in (cuda, cuda.random):
            for name, value in (("get_rng_state", _get_rng_state), ("set_rng_state", _set_rng_state),
                                ("manual_seed", _manual_seed), ("manual_seed_all", _manual_seed)):
                _patches.set(owner, name, value)
        for name, value in (("current_device", _current_device), ("Stream", _Stream), ("Event", _Event),
                            ("current_stream", _current_stream), ("default_stream", _current_stream),
                            ("stream", _stream), ("synchronize", _synchronize),
                            ("get_device_capability", _get_device_capability)):
            _patches.set(cuda, name, value)
        _no_jit_where_unscriptable()  # first: _patch_megatron imports Megatron modules
        _patch_megatron()
        logging.getLogger(_RNG_LOGGER).addFilter(_RNG_FILTER)
        _glibc_keeps_freed_memory(True)
    except BaseException:  # nothing half-installed stays behind
        _glibc_keeps_freed_memory(False)
        logging.getLogger(_RNG_LOGGER).removeFilter(_RNG_FILTER)
        _patches.restore()
        raise
    _enabled = True
    return True


# glibc's mallopt parameters (malloc.h), what the shim sets, glibc's compiled-in defaults
# (malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD) and the start-up variables that override
# them: the tunable and its older alias.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}
_STARTUP_VARS = {_M_MMAP_MAX: ("glibc.malloc.mmap_max", "MALLOC_MMAP_MAX_"),
                 _M_TRIM_THRESHOLD: ("glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_")}
_kept_memory = False


def _startup_environ() -> dict:
    """The environment the process started with, which is what glibc read its malloc settings
    from (once, at start-up; later changes of os.environ do not reach it)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:  # no /proc: the current environment is the best guess
        return dict(os.environ)
    env = {}
    for item in items:
        name, sep, value = item.partition(b"=")
        if sep:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


def _startup_malloc_values(env: dict | None = None) -> dict:
    """{mallopt parameter: the value the process started with}: GLIBC_TUNABLES' entry (the last
    one, as glibc parses it) over the older MALLOC_*_ alias, over glibc's compiled-in default.
    glibc has no getter for these, so this is the only way back to what the process had."""
    env = _startup_environ() if env is None else env
    tunables = dict(item.partition("=")[::2] for item in env.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    values = {}
    for param, (tunable, alias) in _STARTUP_VARS.items():
        text = tunables.get(tunable, env.get(alias))
        try:
            values[param] = int(text, 0) if text is not None else _GLIBC_DEFAULTS[param]
        except ValueError:  # glibc ignores what it cannot parse
            values[param] = _GLIBC_DEFAULTS[param]
    return values


def _glibc_keeps_freed_memory(keep: bool) -> None:
    """glibc keeps freed memory (keep) or goes back to what the process started with; once each way."""
    global _kept_memory
    if keep == _kept_memory:
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for param, value in (_KEEP if keep else _startup_malloc_values()).items():
        mallopt(param, value)
    if not keep:
        malloc_trim(0)  # what it kept goes back to the kernel now
    _kept_memory = keep


def _no_jit(fn):
    return fn


def _no_jit_where_unscriptable() -> None:
    """megatron-core 0.12 sets `jit_fuser = torch.jit.script` on torch < 2.2, which cannot script
    what Megatron decorates with it (methods reading self, closures over objects): importing
    megatron.core.models.gpt (L2Norm) or building a GroupedMLP raises. Where the installed JIT
    cannot, megatron.core.jit's jit_fuser and its `from megatron.core.jit import jit_fuser`
    copies become a no-op, as MindSpeed does; modules imported from now on bind the no-op.
    disable() puts the original back (what was decorated meanwhile stays plain Python)."""
    try:
        from megatron.core import jit
    except ImportError:
        return
    fuser = getattr(jit, "jit_fuser", None)
    if fuser is not None and fuser is not _no_jit and not torch_caps.jit_decorates_methods(fuser):
        _patches.replace_everywhere(fuser, _no_jit, ("megatron",))


def _patch_megatron() -> None:
    for module_name, funcs in _MEGATRON_FUNCS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # megatron-core is optional: the torch.cuda part is still useful
            return
        for name, value in funcs.items():
            original = getattr(module, name, None)
            if original is not None:  # also rebinds `from ... import name` copies
                _patches.replace_everywhere(original, value, ("megatron",))
    define_missing_te_general_gemm(_patches)


def disable() -> None:
    """Remove the shim (and the training part, when on) and restore every original object."""
    global _enabled
    _disable_training()
    if not _enabled:
        return
    _patches.restore()
    _glibc_keeps_freed_memory(False)
    logging.getLogger(_RNG_LOGGER).removeFilter(_RNG_FILTER)
    # The alltoall dispatcher caches its side stream on the class: do not leave ours behind.
    dispatcher_mod = sys.modules.get("megatron.core.transformer.moe.token_dispatcher")
    cls = getattr(dispatcher_mod, "MoEAlltoAllTokenDispatcher", None)
    if cls is not None and isinstance(getattr(cls, "cuda_dtoh_stream", None), _Stream):
        cls.cuda_dtoh_stream = None
    _enabled = False


class _CudaLiteralsOnCpu(torch.overrides.TorchFunctionMode):
    """Megatron's training code creates small tensors with a literal device='cuda' (optimizer,
    clip_grads, loss logging, JIT warm-up), calls .cuda() / .to('cuda') and asserts
    grad.type() == 'torch.cuda.FloatTensor'; on a CPU run those mean the CPU. A torch function
    mode: active inside its `with`, or for a whole run through enable_training()."""

    # The CPU GEMM workers run a grouped product's pieces on threads where this mode is not
    # pushed: allowed, since none of their calls has a CUDA device, .cuda() or .type() (with the
    # mode pushed for a whole run, the pool was otherwise off for every forward GEMM).
    gmm_plugin_workers_may_skip = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and out.startswith("torch."):
            return out.replace("torch.", "torch.cuda.", 1)  # the type name a CUDA tensor would have
        return out


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    return False  # an int means the current accelerator, a dtype or tensor is not a device


def cuda_literals_on_cpu() -> _CudaLiteralsOnCpu:
    """Context for Megatron code on a CPU run: literal CUDA devices mean the CPU."""
    return _CudaLiteralsOnCpu()


# ---------------------------------------------------------------- megatron.training on a CPU

_training = PatchSet()
_literals_mode: _CudaLiteralsOnCpu | None = None
# Where each version keeps the data loader builder that pretrain() uses.
_DATA_LOADER_MODULES = ("megatron.training.datasets.data_samplers",  # 0.13+
                        "megatron.legacy.data.data_samplers")        # 0.12


def training_enabled() -> bool:
    return _literals_mode is not None


def _override(method, /):
    """typing.override (PEP 698, Python 3.12): marks a method as an override; no other effect."""
    try:
        method.__override__ = True
    except (AttributeError, TypeError):
        pass
    return method


def ensure_typing_override(patches: PatchSet | None = None) -> bool:
    """Give Python < 3.12 the `typing.override` that megatron-core 0.19's training code imports.
    Returns True when it was missing and is now there (recorded in `patches` when given)."""
    if hasattr(typing, "override"):
        return False
    if patches is None:
        typing.override = _override
    else:
        patches.set(typing, "override", _override)
    return True


@contextlib.contextmanager
def _one_cuda_device():
    # initialize_megatron builds the model-parallel groups and seeds the RNG tracker only when
    # torch.cuda.device_count() > 0, after torch.cuda.set_device(local_rank).
    scoped = PatchSet()
    scoped.set(torch.cuda, "device_count", lambda: 1)
    scoped.set(torch.cuda, "set_device", lambda device: None)
    try:
        yield
    finally:
        scoped.restore()


def _wrap_initialize_megatron(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize_megatron_on_cpu(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["allow_no_cuda"] = True  # skips only its `assert torch.cuda.is_available()`
        with _one_cuda_device():
            return original(*bound.args, **bound.kwargs)

    initialize_megatron_on_cpu.__gmm_cpu_wrapped__ = original
    return initialize_megatron_on_cpu


def _no_fused_kernels(args):
    """megatron.legacy.fused_kernels.load on a CPU: nothing to build (it would run nvcc)."""


def _data_loader_seed() -> int:
    try:
        from megatron.training.global_vars import get_args
        return int(get_args().seed)
    except Exception:  # built outside pretrain(): any fixed seed keeps runs repeatable
        return 0


def _wrap_data_loader_builder(original):
    @functools.wraps(original)
    def build_pretraining_data_loader(*args, **kwargs):
        loader = original(*args, **kwargs)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            # Its iterators draw their workers' base seed from here, not from the CPU default
            # generator that carries the dropout stream on a CPU run.
            loader.generator = torch.Generator().manual_seed(_data_loader_seed())
        return loader

    return build_pretraining_data_loader


def _patch_training() -> None:
    try:
        initialize = importlib.import_module("megatron.training.initialize")
    except ImportError as e:  # megatron-core alone (< 0.19 wheels): only the torch-level parts apply
        logging.getLogger(__name__).debug("cpu_platform: megatron.training not importable (%s)", e)
        return
    original = initialize.initialize_megatron
    _training.replace_everywhere(original, _wrap_initialize_megatron(original), ("megatron",))
    fused_kernels = sys.modules.get("megatron.legacy.fused_kernels")
    if fused_kernels is not None and hasattr(fused_kernels, "load"):
        _training.set(fused_kernels, "load", _no_fused_kernels)
    for name in _DATA_LOADER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        builder = getattr(module, "build_pretraining_data_loader", None)
        if builder is not None:
            _training.replace_everywhere(builder, _wrap_data_loader_builder(builder), ("megatron",))
            break


def enable_training(force: bool = False) -> bool:
    """enable() plus what megatron.training's loop needs on a CPU (see the module docstring).

    The literal-CUDA mode is pushed on the calling thread's torch function mode stack for the rest
    of the run. The Megatron parts need megatron.training (a Megatron-LM checkout, or
    megatron-core >= 0.19's wheel); without it only the torch-level parts apply. Returns True when
    active; with an accelerator present it does nothing (unless force).
    """
    global _literals_mode
    if _literals_mode is not None:
        return True
    shim_was_on = _enabled
    if not enable(force=force):
        return False
    try:
        ensure_typing_override(_training)  # before anything imports megatron.training
        _patch_training()
        mode = _CudaLiteralsOnCpu()
        mode.__enter__()
        _literals_mode = mode
    except BaseException:  # back to where the call started, the shim included
        _training.restore()
        if not shim_was_on:
            disable()
        raise
    return True


def _disable_training() -> None:
    global _literals_mode
    mode, _literals_mode = _literals_mode, None
    if mode is not None:
        top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) \
            if torch._C._len_torch_function_stack() else None
        if top is not mode:
            _literals_mode = mode
            raise RuntimeError("cpu_platform.disable(): another torch function mode was entered after "
                               "enable_training() and is still active; exit it first.")
        mode.__exit__(None, None, None)
    _training.restore()
