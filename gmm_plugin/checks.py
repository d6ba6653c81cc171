"""Every argument check of npu_gmm / npu_gmm_v2 and its message, in one place.

Messages name the argument and the rule. Where MindSpeed rejects a call, we reject it too
(TypeError for a wrong type or dtype, ValueError for a wrong value or shape).
"""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Grouping axis of C[m, n] = A[m, k] @ B[k, n] (spec: -1 none, 0 m, 1 n, 2 k).
GROUP_TYPES = (-1, 0, 2)


def check_tensor(value, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if allow_none else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}.")


def check_group_type(group_type) -> int:
    if isinstance(group_type, bool) or not isinstance(group_type, int):
        raise TypeError(f"group_type must be an int, got {type(group_type).__name__}.")
    if group_type == 1:
        raise ValueError("group_type 1 (grouping along N) is not supported, as in MindSpeed; "
                         "use group_type 0 (split M) or 2 (split K).")
    if group_type not in GROUP_TYPES:
        raise ValueError(f"group_type must be one of -1, 0 or 2, got {group_type}.")
    return group_type


def check_dtypes(x: torch.Tensor, weight: torch.Tensor, bias) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype must be float16, bfloat16 or float32 "
                            f"(non-quantized GMM only), got {t.dtype}.")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have the same dtype, got x {x.dtype} and weight {weight.dtype}.")
    if bias is not None and bias.dtype != bias_dtype_for(x.dtype):
        raise TypeError(f"bias dtype must be {bias_dtype_for(x.dtype)} when x is {x.dtype} "
                        f"(spec: fp16 x -> fp16 bias, bf16/fp32 x -> fp32 bias), got {bias.dtype}.")


def bias_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.float32


def check_devices(x: torch.Tensor, **others) -> None:
    """MindSpeed's device check, with its message (a RuntimeError there too).

    A group_list tensor may also be on the CPU whatever x's device (an improvement on MindSpeed,
    which rejects it): host counts, what Megatron's dispatchers produce, are then used on the host
    with no device round trip."""
    for name, t in others.items():
        if not isinstance(t, torch.Tensor) or t.device == x.device:
            continue
        if name == "group_list" and t.device.type == "cpu":
            continue
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                           f"devices, {x.device}(arg0) and {t.device}({name})!")


def check_shapes(x: torch.Tensor, weight: torch.Tensor, bias, group_type: int, num_groups: int | None) -> None:
    """Dims and sizes of x, weight and bias for the given group_type."""
    if group_type == 0:
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [M, K] for group_type 0, got shape {tuple(x.shape)}.")
        if weight.dim() != 3:
            raise ValueError(f"weight must be 3-D [E, K, N] for group_type 0, got shape {tuple(weight.shape)}.")
        if weight.shape[1] != x.shape[1]:
            raise ValueError(f"weight.shape[1] (K={weight.shape[1]}) must equal x.shape[1] (K={x.shape[1]}) "
                             "for group_type 0.")
        if num_groups is not None and weight.shape[0] != num_groups:
            raise ValueError(f"group_list has {num_groups} groups but weight has {weight.shape[0]} "
                             "experts (weight.shape[0]); they must be equal for group_type 0.")
        n, groups = weight.shape[2], weight.shape[0]
    elif group_type == 2:
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [K', M] for group_type 2, got shape {tuple(x.shape)}.")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [M, N] for group_type 2, got shape {tuple(weight.shape)}.")
        if weight.shape[0] != x.shape[1]:
            raise ValueError(f"weight.shape[0] (M={weight.shape[0]}) must equal x.shape[1] (M={x.shape[1]}) "
                             "for group_type 2 (the grouped axis).")
        n, groups = weight.shape[1], num_groups
    else:
        if x.dim() != 2 or weight.dim() != 2:
            raise ValueError("x and weight must be 2-D for group_type -1 (no grouping), got shapes "
                             f"{tuple(x.shape)} and {tuple(weight.shape)}.")
        if weight.shape[0] != x.shape[1]:
            raise ValueError(f"weight.shape[0] ({weight.shape[0]}) must equal x.shape[1] ({x.shape[1]}).")
        if bias is not None and tuple(bias.shape) not in ((weight.shape[1],), (1, weight.shape[1])):
            raise ValueError(f"bias must have shape [N] or [1, N] with N={weight.shape[1]} for group_type -1, "
                             f"got {tuple(bias.shape)}.")
        return
    if bias is not None and tuple(bias.shape) != (groups, n):
        raise ValueError(f"bias must have shape [E, N] = [{groups}, {n}], got {tuple(bias.shape)}.")


# ---- group_list --------------------------------------------------------------------------------

def check_group_list_type(group_list, *, cumsum: bool, group_type: int) -> None:
    if group_type == -1:
        if group_list is not None:
            raise ValueError("group_list must be None for group_type -1 (no grouping).")
        return
    if group_list is None:
        raise ValueError(f"group_list is required for group_type {group_type}.")
    if isinstance(group_list, torch.Tensor):
        if group_list.dim() != 1:
            raise ValueError("If group_list is not None, it must be an one-dimensional tensor, "
                             f"got dimension of group_list: {group_list.dim()}!")
        if group_list.dtype != torch.int64:
            raise TypeError(f"group_list must be a List of int64, got group_list type: "
                            f"{type(group_list).__name__}, dtype: {group_list.dtype}!")
    elif isinstance(group_list, (list, tuple)):
        bad = [v for v in group_list if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise TypeError(f"group_list must be a List of int64, got an element {bad[0]!r} "
                            f"of type {type(bad[0]).__name__}.")
    else:
        form = "cumulative sums" if cumsum else "per-group counts"
        raise TypeError(f"group_list ({form}) must be a list of int or a 1-D int64 torch.Tensor, "
                        f"got {type(group_list).__name__}.")
    if len(group_list) == 0:
        raise ValueError("group_list must have at least one group, got an empty group_list.")


INT64_MAX = 2**63 - 1


def check_group_list_values(values: list[int], *, cumsum: bool, total: int, axis: str) -> None:
    """Host-side check of group_list values against the grouped axis of size `total`."""
    prev = 0
    for i, v in enumerate(values):
        if v < 0:
            raise ValueError(f"group_list must be non-negative, got group_list[{i}] = {v}.")
        if cumsum and v < prev:
            raise ValueError("group_list (cumulative sums, npu_gmm) must be non-decreasing, got "
                             f"group_list[{i}] = {v} < group_list[{i - 1}] = {prev}.")
        prev = v
    covered = values[-1] if cumsum else sum(values)
    if covered != total:
        rule = "the last value of group_list (cumsum)" if cumsum else "the sum of group_list (counts)"
        raise ValueError(f"{rule} must equal {axis} = {total}, got {covered}; group_list must cover the "
                         "grouped axis exactly.")


def assert_group_list_async(values: torch.Tensor, *, cumsum: bool, total: int) -> None:
    """Device-side check with no host sync: fails asynchronously (immediately on CPU)."""
    if cumsum:
        ok = (values[0] >= 0) & (values[1:] >= values[:-1]).all() & (values[-1] == total)
        msg = f"group_list (cumsum) must be non-negative, non-decreasing and end at {total}"
    else:
        # Each count <= total first, so the sum cannot wrap around int64.
        ok = (values >= 0).all() & (values <= total).all() & (values.sum() == total)
        msg = f"group_list (counts) must be non-negative and sum to {total}"
    torch._assert_async(ok, msg)


def check_fusion_args(gemm_fusion, original_weight) -> None:
    if not isinstance(gemm_fusion, bool):
        raise TypeError(f"gemm_fusion must be a bool, got {type(gemm_fusion).__name__}.")
    check_tensor(original_weight, "original_weight", allow_none=True)
    if gemm_fusion and original_weight is None:
        raise ValueError("gemm_fusion=True needs original_weight: the Parameter whose main_grad "
                         "accumulates the weight gradient.")
