"""A test double of torch_npu's two grouped-matmul ops, on CPU tensors, for testing the npu backend.

It implements the documented contract of

    torch_npu.npu_grouped_matmul(x: list[Tensor], weight: list[Tensor], *, bias=None, ...,
        group_list: Tensor | None = None, split_item=0, group_type=None, group_list_type=0, ...)
    torch_npu.npu_grouped_matmul_add_(self, x, weight, group_list, *, transpose_x=True,
        transpose_weight=False, group_type=2, group_list_type=0) -> self

(torch_npu's op-plugin and its docs, and CANN's aclnnGroupedMatmulV4 / aclnnGroupedMatmulAdd docs:
see docs/npu.md), for the non-quantized single-tensor scenarios a grouped MLP uses:

  * group_type 0: x [M, K] (not transposed), weight [E, K, N] (contiguous or a transposed view),
    split_item 2 or 3 -> [y [M, N]]; group_type 2: x [P, T] (must be a transposed view), weight
    [T, N] (not transposed) -> [y [E, P, N]]; empty groups give zeros.
  * group_list: an int64 1-D tensor on x's device, at most 1024 groups, group_list_type 0 (cumsum)
    or 1 (counts); the innermost dim of x and of weight below 65536; fp16/bf16/fp32 with equal dtypes.
  * npu_grouped_matmul_add_: self fp32 [g, M, N] contiguous, x [K, M] and weight [K, N] fp16/bf16,
    self[e] += x[seg]^T @ weight[seg], in place, returns self.

Two kinds of failure, told apart on purpose:
  * RuntimeError / TypeError: what torch_npu or aclnn checks and raises on real hardware.
  * KernelContractViolation: inputs the real kernel does NOT check and silently mishandles
    (a group_list that overruns x or leaves rows uncovered: out-of-bounds reads and uninitialised
    output; a length-1 group_list, which MindSpeed documents as unsupported; counts sent to GMM+ADD,
    which on Atlas A2/A3 reads group_list as cumsum whatever group_list_type says). The backend
    must never send these; on hardware they would be silent garbage, here they fail the test.

Scenarios the plugin never uses (quantization, activations, multi-tensor lists, group_type -1,
the .List overload with a host int[] group_list) raise NotImplementedError: this double does not
model them. Rows of a group_type-0 output that no group covers are NaN (uninitialised memory).

Use `with installed(): ...` to stand it in for torch_npu (sys.modules) for a block; `calls`
records every call with its arguments so tests can pin exactly what the backend passes.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch

__version__ = "2.9.0+test.double"
__gmm_plugin_test_double__ = True   # lets the npu backend run on CPU tensors (NpuBackend.supports)

MAX_GROUPS = 1024
LAST_DIM_LIMIT = 65536
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
calls: list[tuple[str, dict]] = []


class KernelContractViolation(AssertionError):
    """Input the real kernel does not check and would mishandle silently (see module docstring)."""


def _check_group_list(group_list, x_device, num_groups: int | None, total: int, gl_type: int,
                      *, exact: bool, op: str) -> list[int]:
    if isinstance(group_list, (list, tuple)):
        raise NotImplementedError(f"{op}: the .List overload (host int[] group_list, always read as cumsum, "
                                  "no group_list_type) is not modelled; the plugin must pass a tensor.")
    if not isinstance(group_list, torch.Tensor):
        raise TypeError(f"{op}(): argument 'group_list' must be Tensor, not {type(group_list).__name__}")
    if group_list.dtype != torch.int64 or group_list.dim() != 1:
        raise RuntimeError(f"{op}: group_list must be a 1-D int64 tensor, got {group_list.dtype} "
                           f"with {group_list.dim()} dims (ACLNN_ERR_PARAM_INVALID 161002).")
    if group_list.device != x_device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x_device} and {group_list.device}!")
    g = group_list.shape[0]
    if g > MAX_GROUPS:
        raise RuntimeError(f"{op}: group_list has {g} groups, at most {MAX_GROUPS} are supported "
                           "(ACLNN_ERR_PARAM_INVALID 161002).")
    if g == 0:
        raise RuntimeError(f"{op}: group_list must not be empty.")
    if num_groups is not None and g != num_groups:
        raise RuntimeError(f"{op}: group_list has {g} groups but weight has {num_groups}.")
    if gl_type not in (0, 1):
        raise NotImplementedError(f"{op}: group_list_type {gl_type} is not modelled (0 cumsum, 1 counts).")
    values = group_list.tolist()
    if any(v < 0 for v in values):
        raise KernelContractViolation(f"{op}: negative group_list {values}: undefined on the real kernel.")
    if gl_type == 0:
        if any(b < a for a, b in zip(values, values[1:])):
            raise KernelContractViolation(f"{op}: decreasing cumsum group_list {values}: undefined on the "
                                          "real kernel.")
        ends = values
    else:
        ends, acc = [], 0
        for v in values:
            acc += v
            ends.append(acc)
    covered = ends[-1]
    if covered > total or (exact and covered != total):
        raise KernelContractViolation(
            f"{op}: group_list covers {covered} of {total} rows ({'cumsum' if gl_type == 0 else 'counts'} "
            f"{values}): the real kernel would {'read out of bounds' if covered > total else 'leave rows uninitialised'}.")
    return ends


def _check_dims(op: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        for size in t.shape:
            aligned = -(-size * t.element_size() // 32) * 32 // t.element_size()
            if aligned >= 2**31 - 1:
                raise RuntimeError(f"{op}: dim {size} exceeds int32 after 32-byte alignment.")


def _is_transposed(t: torch.Tensor) -> bool:
    return t.transpose(-1, -2).is_contiguous()


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    op = "npu_grouped_matmul"
    calls.append((op, dict(x=list(x), weight=list(weight), bias=bias, group_list=group_list, split_item=split_item,
                           group_type=group_type, group_list_type=group_list_type, act_type=act_type,
                           output_dtype=output_dtype)))
    if not isinstance(x, (list, tuple)) or not isinstance(weight, (list, tuple)):
        raise TypeError(f"{op}(): arguments 'x' and 'weight' must be lists of tensors (Tensor[]).")
    if len(x) == 0 or len(weight) == 0:
        raise RuntimeError("Invalid inputs: neither x nor weight could be empty.")
    if split_item not in (0, 1, 2, 3):
        raise RuntimeError(f"Invalid value of split_item [{split_item}], which should only be one of 0/1/2/3.")
    if group_type is None:
        raise RuntimeError("Requires manual passing group_type, current is None.")
    if group_type not in (-1, 0, 2):
        raise RuntimeError(f"The group type must be -1, 0 or 2, but now is [{group_type}]")
    quant = (scale, offset, antiquant_scale, antiquant_offset, per_token_scale, activation_input,
             activation_quant_scale, activation_quant_offset, output_dtype, x_dtype, weight_dtype)
    if any(v is not None for v in quant) or act_type != 0:
        raise NotImplementedError(f"{op}: quantization, activations and dtype overrides are not modelled.")
    if len(x) != 1 or len(weight) != 1 or group_type == -1:
        raise NotImplementedError(f"{op}: only single-tensor x/weight/y with group_type 0 or 2 is modelled.")
    if split_item not in (2, 3):
        raise RuntimeError(f"{op}: group_type {group_type} with single tensors needs split_item 2 or 3, "
                           f"got {split_item}.")
    xt, wt = x[0], weight[0]
    if xt.dtype not in DTYPES or wt.dtype != xt.dtype:
        raise RuntimeError(f"{op}: x {xt.dtype} and weight {wt.dtype} must be the same of float16, bfloat16, "
                           "float32 (ACLNN_ERR_PARAM_INVALID 161002).")
    if wt.device != xt.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{xt.device} and {wt.device}!")
    _check_dims(op, xt, wt)
    if group_type == 0:
        if xt.dim() != 2 or wt.dim() != 3:
            raise RuntimeError(f"{op}: group_type 0 needs x 2-D and weight 3-D, got {xt.dim()}-D and {wt.dim()}-D.")
        if wt.shape[1] != xt.shape[1]:
            raise RuntimeError(f"{op}: K of x ({xt.shape[1]}) and weight ({wt.shape[1]}) differ.")
        if not xt.is_contiguous():
            raise RuntimeError(f"{op}: x must be contiguous for group_type 0 (x不支持转置).")
        w_transposed = not wt.is_contiguous()
        if w_transposed and not _is_transposed(wt):
            raise RuntimeError(f"{op}: weight must be contiguous or a transposed view, got strides {wt.stride()}.")
        if bias is not None:
            raise NotImplementedError(f"{op}: bias is not modelled (the plugin adds bias itself).")
    else:
        if xt.dim() != 2 or wt.dim() != 2:
            raise RuntimeError(f"{op}: group_type 2 needs x and weight 2-D.")
        if xt.shape[1] != wt.shape[0]:
            raise RuntimeError(f"{op}: the grouped axis of x ({xt.shape[1]}) and weight ({wt.shape[0]}) differ.")
        if not _is_transposed(xt) or not wt.is_contiguous():
            raise RuntimeError(f"{op}: group_type 2 needs x transposed and weight not transposed "
                               "(仅支持x转置且weight不转置).")
        if bias is not None:
            raise RuntimeError(f"{op}: bias must be empty for group_type 2.")
        w_transposed = False
    x_last = xt.shape[0] if group_type == 2 else xt.shape[1]          # x's innermost dim in memory
    w_last = wt.shape[-2] if w_transposed else wt.shape[-1]
    if x_last >= LAST_DIM_LIMIT or w_last >= LAST_DIM_LIMIT:
        raise RuntimeError(f"{op}: the last dim of x ({x_last}) and of weight ({w_last}) must be below "
                           f"{LAST_DIM_LIMIT}.")
    if group_list is None:
        raise RuntimeError(f"{op}: group_list is required for group_type {group_type}.")
    num_groups = wt.shape[0] if group_type == 0 else None
    total = xt.shape[0] if group_type == 0 else xt.shape[1]
    ends = _check_group_list(group_list, xt.device, num_groups, total, group_list_type, exact=True, op=op)
    if len(ends) == 1:
        raise KernelContractViolation(f"{op}: a group_list of length 1 is unsupported (MindSpeed: 长度不能为1).")
    # Arithmetic of the kernel: float32 accumulation, one rounding to x's dtype.
    start, f32 = 0, torch.float32
    if group_type == 0:
        y = torch.full((xt.shape[0], wt.shape[-1]), float("nan"), dtype=xt.dtype)  # uninitialised
        for e, end in enumerate(ends):
            if end > start:
                y[start:end] = torch.mm(xt[start:end].to(f32), wt[e].to(f32)).to(xt.dtype)
            start = end
    else:
        y = torch.zeros(len(ends), xt.shape[0], wt.shape[1], dtype=xt.dtype)
        for e, end in enumerate(ends):
            if end > start:
                y[e] = torch.mm(xt[:, start:end].to(f32), wt[start:end].to(f32)).to(xt.dtype)
            start = end
    return [y]


def npu_grouped_matmul_add_(self, x, weight, group_list, *, transpose_x=True, transpose_weight=False,
                            group_type=2, group_list_type=0):
    op = "npu_grouped_matmul_add_"
    calls.append((op, dict(self=self, x=x, weight=weight, group_list=group_list, transpose_x=transpose_x,
                           transpose_weight=transpose_weight, group_type=group_type,
                           group_list_type=group_list_type)))
    if transpose_x is not True or transpose_weight is not False or group_type != 2:
        raise RuntimeError(f"{op}: only transpose_x=True, transpose_weight=False, group_type=2 are supported.")
    if self.dtype != torch.float32:
        raise RuntimeError(f"{op}: self must be float32, got {self.dtype}.")
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise RuntimeError(f"{op}: x and weight must both be float16 or both bfloat16, got {x.dtype}, {weight.dtype}.")
    if self.dim() != 3 or x.dim() != 2 or weight.dim() != 2:
        raise RuntimeError(f"{op}: self must be 3-D (g, M, N), x 2-D (K, M), weight 2-D (K, N).")
    if not self.is_contiguous():
        raise RuntimeError(f"{op}: self must be contiguous (非连续Tensor不支持).")
    if len({self.device, x.device, weight.device}) != 1:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices!")
    if x.shape[0] != weight.shape[0] or tuple(self.shape[1:]) != (x.shape[1], weight.shape[1]):
        raise RuntimeError(f"{op}: shapes self {tuple(self.shape)}, x {tuple(x.shape)}, weight "
                           f"{tuple(weight.shape)} do not match (g, M, N), (K, M), (K, N).")
    if min(x.numel(), weight.numel(), self.numel()) == 0:
        raise RuntimeError(f"{op}: empty tensors are not supported.")
    if x.shape[1] >= LAST_DIM_LIMIT or weight.shape[1] >= LAST_DIM_LIMIT:
        raise RuntimeError(f"{op}: the last dims M ({x.shape[1]}) and N ({weight.shape[1]}) must be below "
                           f"{LAST_DIM_LIMIT}.")
    _check_dims(op, x, weight)
    if group_list_type != 0:
        raise KernelContractViolation(f"{op}: group_list_type {group_list_type}: on Atlas A2/A3 torch_npu runs "
                                      "aclnnGroupedMatmulAdd, which reads group_list as cumsum regardless.")
    ends = _check_group_list(group_list, x.device, self.shape[0], x.shape[0], 0, exact=False, op=op)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            self[e] += torch.mm(x[start:end].t().float(), weight[start:end].float())
        start = end
    return self


@contextlib.contextmanager
def installed():
    """Stand this double in for torch_npu (sys.modules['torch_npu']) inside the block."""
    module = sys.modules[__name__]
    previous = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = module
    try:
        yield module
    finally:
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous


def without_add_op() -> types.ModuleType:
    """A variant without npu_grouped_matmul_add_ (an older torch_npu): fusion must fall back."""
    module = types.ModuleType("torch_npu")
    module.__version__ = __version__
    module.__gmm_plugin_test_double__ = True
    module.npu_grouped_matmul = npu_grouped_matmul
    return module


from variants import Variant  # noqa: E402

# The op suite's variant for this double (tests/conftest.py).
VARIANTS = [Variant("npu", "npu", enter=installed,
                    skip={"test_gradcheck_float64": "aclnn GroupedMatmul has no float64 (the public API never passes it)"})]
