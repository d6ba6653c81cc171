"""gemm_fusion: add the weight gradient straight into original_weight.main_grad.

This follows Megatron's gradient-accumulation-fusion protocol (megatron/core/tensor_parallel/
layers.py): the backward pass accumulates x_e^T dY_e into main_grad, then, when DDP owns the
parameter (it has `grad_added_to_main_grad`), sets that flag and hands autograd a dummy gradient
so DDP's hook fires without adding anything twice; otherwise it returns no weight gradient.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary


# main_grad dtypes the in-place accumulation can add a weight gradient into (Megatron's is float32).
MAIN_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def main_grad_view(original_weight: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """main_grad seen through the same view that turns original_weight into weight.

    weight must be a view of original_weight (e.g. P[K, E*N].view(E, K, N) or
    P[E, N, K].transpose(-1, -2)); the result has weight's shape and strides, so a backend can
    accumulate into it group by group without allocating a gradient-sized tensor.
    """
    main_grad = getattr(original_weight, "main_grad", None)
    if main_grad is None:
        raise ValueError("original_weight has no main_grad: gemm_fusion accumulates into "
                         "original_weight.main_grad (Megatron's DistributedDataParallel provides it).")
    if not isinstance(main_grad, torch.Tensor):
        raise TypeError(f"original_weight.main_grad must be a torch.Tensor, got {type(main_grad).__name__}.")
    if main_grad.dtype not in MAIN_GRAD_DTYPES:
        raise TypeError(f"original_weight.main_grad dtype must be one of "
                        f"{', '.join(str(d).replace('torch.', '') for d in MAIN_GRAD_DTYPES)} "
                        f"(the weight gradient is added into it), got {main_grad.dtype}.")
    if main_grad.requires_grad:
        raise ValueError("original_weight.main_grad must not require grad: gemm_fusion adds into it in "
                         "place, outside autograd (Megatron's main_grad is a gradient buffer).")
    if main_grad.device != weight.device:
        raise ValueError(f"original_weight.main_grad is on {main_grad.device} but weight is on {weight.device}.")
    if main_grad.numel() != original_weight.numel():
        raise ValueError(f"original_weight.main_grad has shape {tuple(main_grad.shape)} "
                         f"({main_grad.numel()} elements) and cannot hold the gradient of original_weight "
                         f"with shape {tuple(original_weight.shape)} ({original_weight.numel()} elements).")
    if not _same_storage(weight, original_weight):
        raise ValueError("weight must be a view of original_weight (the same storage) for gemm_fusion, "
                         "so that its gradient has a place in original_weight.main_grad.")
    offset = weight.storage_offset() - original_weight.storage_offset()
    last = offset + sum((s - 1) * st for s, st in zip(weight.shape, weight.stride()) if s > 0)
    if offset < 0 or (weight.numel() > 0 and last >= original_weight.numel()) or \
            not original_weight.is_contiguous():
        raise ValueError("weight must be a view inside a contiguous original_weight for gemm_fusion.")
    if not main_grad.is_contiguous():
        raise ValueError("original_weight.main_grad must be contiguous for gemm_fusion.")
    return main_grad.view(-1).as_strided(weight.shape, weight.stride(), main_grad.storage_offset() + offset)


# The dummies: one buffer per (shape, strides, dtype, device, zero), shared by the parameters that
# use it and alive only while one of them is: each parameter holds its own (weakly keyed, so a
# deleted layer frees them), the shared table holds them weakly.
_shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_held = WeakIdKeyDictionary()  # parameter -> {key: dummy}
_lock = threading.Lock()


def weight_grad_after_fusion(original_weight: torch.Tensor, weight: torch.Tensor):
    """The gradient autograd gets for weight once main_grad holds the real one.

    Under Megatron's DDP (the parameter has `grad_added_to_main_grad`) autograd still wants a
    gradient so that DDP's hook fires; the hook then sees the flag and drops it. That dummy is one
    buffer per shape, strides, dtype and device, shared by the parameters that use it (as
    Transformer Engine does) and freed when the last of them is, so a backward allocates nothing
    weight-sized. It is handed out as a fresh tensor object on the buffer's storage (detach()):
    AccumulateGrad adopts such a tensor as .grad without copying it, and DDP's hook sets .grad
    back to None. Zeros when `zero_out_wgrad` asks for them (DDP then adds it).
    """
    if not hasattr(original_weight, "grad_added_to_main_grad"):
        return None
    original_weight.grad_added_to_main_grad = True
    zero = bool(getattr(original_weight, "zero_out_wgrad", False) or getattr(weight, "zero_out_wgrad", False))
    key = (tuple(weight.shape), weight.stride(), weight.dtype, weight.device, zero)
    with _lock:
        mine = _held.setdefault(original_weight, {})
        dummy = mine.get(key)
        if dummy is None:
            dummy = _shared.get(key)
            if dummy is None:
                # Same strides as weight, so AccumulateGrad keeps it as it is.
                dummy = torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype,
                                            device=weight.device)
                _shared[key] = dummy
            mine[key] = dummy
    if zero:
        dummy.zero_()  # whoever held it last may have written into it
    return dummy.detach()


def dummy_bytes() -> int:
    """Bytes of the dummy buffers alive now."""
    with _lock:
        return sum(d.untyped_storage().nbytes() for d in list(_shared.values()))


def release_dummies() -> None:
    """Drop every cached dummy (patches.revert() calls this); the next fused backward makes a new one."""
    with _lock:
        _held.clear()
        _shared.clear()
