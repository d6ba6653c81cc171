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
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ._patching import PatchSet

__all__ = ["enable", "disable", "is_enabled", "accelerator_present", "cuda_literals_on_cpu"]

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
        _patch_megatron()
        logging.getLogger(_RNG_LOGGER).addFilter(_RNG_FILTER)
    except BaseException:
        _patches.restore()
        raise
    _enabled = True
    return True


def _patch_megatron() -> None:
    import importlib
    for module_name, funcs in _MEGATRON_FUNCS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # megatron-core is optional: the torch.cuda part is still useful
            return
        for name, value in funcs.items():
            original = getattr(module, name, None)
            if original is not None:  # also rebinds `from ... import name` copies
                _patches.replace_everywhere(original, value, ("megatron",))
    # megatron-core 0.16.x without Transformer Engine never defines this name but reads it in the
    # router's gating linear (NameError); None is what its own check expects.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if "te_general_gemm" not in vars(moe_utils):
        _patches.set(moe_utils, "te_general_gemm", None)


def disable() -> None:
    """Remove the shim and restore every original object."""
    global _enabled
    if not _enabled:
        return
    _patches.restore()
    logging.getLogger(_RNG_LOGGER).removeFilter(_RNG_FILTER)
    # The alltoall dispatcher caches its side stream on the class: do not leave ours behind.
    import sys
    dispatcher_mod = sys.modules.get("megatron.core.transformer.moe.token_dispatcher")
    cls = getattr(dispatcher_mod, "MoEAlltoAllTokenDispatcher", None)
    if cls is not None and isinstance(getattr(cls, "cuda_dtoh_stream", None), _Stream):
        cls.cuda_dtoh_stream = None
    _enabled = False


class _CudaLiteralsOnCpu(torch.overrides.TorchFunctionMode):
    """Megatron's optimizer (FP32Optimizer, clip_grads) creates small tensors with a literal
    device='cuda', calls .cuda() and asserts grad.type() == 'torch.cuda.FloatTensor'; on a CPU
    run those mean the CPU. A torch function mode, so it is active only inside its `with`
    (the optimizer's construction and step), never process-wide."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and out.startswith("torch."):
            return out.replace("torch.", "torch.cuda.", 1)  # the type name a CUDA tensor would have
        return out


def cuda_literals_on_cpu() -> _CudaLiteralsOnCpu:
    """Context for Megatron's optimizer on a CPU run: literal CUDA devices mean the CPU."""
    return _CudaLiteralsOnCpu()
