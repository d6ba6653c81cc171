"""CPU stand-ins for what runs below torch_npu's grouped-matmul ops: op-plugin's C++ checks per
release (tests/torch_npu_double/releases.py) and CANN's aclnnGroupedMatmulV4/V5 and
aclnnGroupedMatmulAdd/AddV2, for the non-quantized single-tensor scenarios a grouped MLP uses.

Two kinds of failure, told apart on purpose:
  * RuntimeError: what op-plugin or aclnn check and raise on real hardware (the argument parsing
    itself is torch's dispatcher: these functions are registered under each release's schema).
  * KernelContractViolation: inputs the real kernel does NOT check and silently mishandles
    (a group_list that overruns x or leaves rows uncovered: out-of-bounds reads and uninitialised
    output; a length-1 group_list, which MindSpeed documents as unsupported; counts given to
    aclnnGroupedMatmulAdd V1, which reads group_list as cumulative sums whatever group_list_type
    says; a weight that is a slice of a private-format storage, whose description op-plugin's
    ConvertType makes from the whole storage desc and the view's offset). The backend must never send
    these; on hardware they would be silent garbage.

Scenarios the plugin never uses (quantization, activations, multi-tensor lists, group_type -1,
the .List overload with a host int[] group_list, 6.0's V1 op) raise NotImplementedError.
Rows of a group_type-0 output that no group covers are NaN (uninitialised memory).
"""
from __future__ import annotations

import torch

from . import formats, releases as R

MAX_GROUPS = 1024
LAST_DIM_LIMIT = 65536
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PARAM_INVALID = "(ACLNN_ERR_PARAM_INVALID 161002)"


class KernelContractViolation(AssertionError):
    """Input the real kernel does not check and would mishandle silently (see module docstring)."""


class State:
    """What the device and CANN under one installed release look like (settable by tests)."""

    def __init__(self, release: R.Release):
        self.release = release
        self.soc = R.SOC_VERSIONS["Ascend910B3"]   # an Atlas A2 training chip
        self.cann_kernels = {"aclnnGroupedMatmulV4", "aclnnGroupedMatmulV5", "aclnnGroupedMatmulAdd",
                             "aclnnGroupedMatmulAddV2", "aclnnGroupedMatmulWeightNz"}


def bind(schema: torch._C.FunctionSchema, args, kwargs) -> dict:
    """The dispatcher hands a Python kernel only what the caller passed: fill in the schema's defaults."""
    bound = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        else:
            bound[a.name] = a.default_value
    return bound


def _check_group_list(group_list, x_device, num_groups, total: int, gl_type: int, *, exact: bool, op: str):
    if group_list.dtype != torch.int64 or group_list.dim() != 1:
        raise RuntimeError(f"{op}: group_list must be a 1-D int64 tensor, got {group_list.dtype} "
                           f"with {group_list.dim()} dims {PARAM_INVALID}.")
    if group_list.device != x_device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x_device} and {group_list.device}!")
    g = group_list.shape[0]
    if g > MAX_GROUPS:
        raise RuntimeError(f"{op}: group_list has {g} groups, at most {MAX_GROUPS} are supported {PARAM_INVALID}.")
    if g == 0:
        raise RuntimeError(f"{op}: group_list must not be empty {PARAM_INVALID}.")
    if num_groups is not None and g != num_groups:
        raise RuntimeError(f"{op}: group_list has {g} groups but weight has {num_groups} {PARAM_INVALID}.")
    if gl_type not in (0, 1):
        raise NotImplementedError(f"{op}: group_list_type {gl_type} is not modelled (0 cumsum, 1 counts).")
    values = group_list.tolist()  # the kernel reads it on the device; this is the double's model of that
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
        what = "read out of bounds" if covered > total else "leave rows uninitialised"
        raise KernelContractViolation(
            f"{op}: group_list covers {covered} of {total} rows ({'cumsum' if gl_type == 0 else 'counts'} "
            f"{values}): the real kernel would {what}.")
    return ends


def _check_dims(op: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        for size in t.shape:
            aligned = -(-size * t.element_size() // 32) * 32 // t.element_size()
            if aligned >= 2**31 - 1:
                raise RuntimeError(f"{op}: dim {size} exceeds int32 after 32-byte alignment {PARAM_INVALID}.")


def _is_transposed(t: torch.Tensor) -> bool:
    return t.transpose(-1, -2).is_contiguous()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cube unit's arithmetic: float32 accumulation."""
    return torch.mm(a.float(), b.float())


# ---- storage formats ------------------------------------------------------------------------------

def _gmm_kernel(state: State, op: str, xt, wt, group_type: int) -> str:
    """The aclnn kernel op-plugin runs for these operands, after its and CANN's format checks
    (op-plugin GroupedMatmulKernelNpuOpApi.cpp; ops-transformer aclnn_grouped_matmul.cpp CheckFormat,
    TransWeightToNz, ParamsWeightNzDtype, aclnnGroupedMatmulWeightNzGetWorkspaceSize)."""
    wfmt, xfmt = formats.get_npu_format(wt), formats.get_npu_format(xt)
    v5 = state.release.k_split != R.K_SPLIT_BAD_OUTPUT and "aclnnGroupedMatmulV5" in state.cann_kernels
    kernel = "aclnnGroupedMatmulV5" if v5 else "aclnnGroupedMatmulV4"
    if xfmt not in _BASE_FORMATS:
        raise RuntimeError(f"{op}: Format of x[0] {xfmt} is invalid {PARAM_INVALID}.")
    if wfmt in _BASE_FORMATS:
        return kernel
    if wfmt not in (formats.FRACTAL_NZ, 50) + state.release.weight_nz_formats:
        # CheckFormat: of the private formats, weight takes NZ (and NZ_C0_16) unless op-plugin routes it to WeightNz
        raise RuntimeError(f"{op}: Format of weight[0] {wfmt} is invalid {PARAM_INVALID}.")
    if not formats.is_whole(wt):
        raise KernelContractViolation(
            f"{op}: weight is a view (offset {wt.storage_offset()}, shape {tuple(wt.shape)}) into a storage of NPU "
            f"format {wfmt} (storage dims {formats.storage_sizes(wt)}): neither op-plugin nor CANN defines it.")
    if wfmt in state.release.weight_nz_formats:
        if "aclnnGroupedMatmulWeightNz" not in state.cann_kernels:
            raise RuntimeError("Format of weight in npu_grouped_matmul is FRACTAL_NZ, current CANN version do not "
                               "support with this format. Please try to update the version of CANN.")
        kernel = "aclnnGroupedMatmulWeightNz"
        if group_type == 2:
            raise RuntimeError(f"{op}: Not support split k dim now, groupType can not be 2. {PARAM_INVALID}")
        if xt.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"{op}: ParamsWeightNzDtype failed: only supported x-weight: INT8-INT8, BF16-BF16, "
                               f"FP16-FP16, INT8-INT4, INT4-INT4, FP16/BF16-FP4_E2M1 {PARAM_INVALID}.")
    k, n = (wt.shape[-1], wt.shape[-2]) if not wt.is_contiguous() else (wt.shape[-2], wt.shape[-1])
    if k % 16 or n % 16:
        raise RuntimeError(f"{op}: When weight format is FRACTAL_NZ, weight'shape(k[{k}], n[{n}]) should be divisible "
                           f"by [16, 16] for BF16/FP16 {PARAM_INVALID}.")
    return kernel


_BASE_FORMATS = (0, 1, 2, 30)  # FormatHelper::IsOpInputBaseFormat (CANN takes them as ND here)


def get_npu_format(state: State, a: dict, calls: list) -> int:
    return formats.get_npu_format(a["self"])


def npu_format_cast(state: State, a: dict, calls: list) -> torch.Tensor:
    return formats.npu_format_cast(a["self"], a["acl_format"])


# ---- npu_grouped_matmul ---------------------------------------------------------------------------

def _op_plugin_group_type(release: R.Release, group_type) -> int:
    """op-plugin's own checks of group_type before aclnn runs (GroupedMatmulKernelNpuOpApi.cpp)."""
    if group_type is None:
        raise RuntimeError("Requires manual passing group_type, current is None.")
    if release.k_split == R.K_SPLIT_REJECTED and group_type not in (-1, 0):
        raise RuntimeError(f"group_type currently only support -1 and 0, current value is {group_type}")
    if group_type not in (-1, 0, 2):
        raise RuntimeError("Use Tensor input with current cann version, "
                           f"The group type must be -1, 0 or 2, but now is [{group_type}]")
    return group_type


def grouped_matmul(state: State, a: dict, calls: list) -> list[torch.Tensor]:
    op = "npu_grouped_matmul"
    release = state.release
    calls.append((op, dict(a, release=release.name)))
    if release.k_split == R.K_SPLIT_UNMODELLED:
        raise NotImplementedError(f"{op}: the {release.name} op (aclnnGroupedMatmul V1, host int[] group_list) "
                                  "is not modelled; the plugin must not call it.")
    x, weight = a["x"], a["weight"]
    if len(x) == 0 or len(weight) == 0:
        raise RuntimeError("Invalid inputs: neither x nor weight could be empty.")
    split_item = a["split_item"]
    if split_item not in (0, 1, 2, 3):
        raise RuntimeError(f"Invalid value of split_item [{split_item}], which should only be one of 0/1/2/3.")
    group_type = _op_plugin_group_type(release, a["group_type"])
    unmodelled = ("scale", "offset", "antiquant_scale", "antiquant_offset", "per_token_scale", "activation_input",
                  "activation_quant_scale", "activation_quant_offset", "output_dtype", "x_dtype", "weight_dtype",
                  "scale_dtype", "per_token_scale_dtype", "tuning_config")
    if any(a.get(k) is not None for k in unmodelled) or a["act_type"] not in (0, None):
        raise NotImplementedError(f"{op}: quantization, activations, tuning and dtype overrides are not modelled.")
    if len(x) != 1 or len(weight) != 1 or group_type == -1:
        raise NotImplementedError(f"{op}: only single-tensor x/weight/y with group_type 0 or 2 is modelled.")
    if split_item not in (2, 3):
        raise RuntimeError(f"{op}: group_type {group_type} with single tensors needs split_item 2 or 3, "
                           f"got {split_item} {PARAM_INVALID}.")
    group_list = a["group_list"]
    if group_list is None:
        raise RuntimeError(f"{op}: group_list is required for group_type {group_type} {PARAM_INVALID}.")
    if "aclnnGroupedMatmulV4" not in state.cann_kernels:
        raise RuntimeError("group_list don't support Tensor input with current cann version. "
                           "Please update cann version to 8.0.RC3 or higher, or use List[int] as input.")
    xt, wt = x[0], weight[0]
    if group_type == 2 and release.k_split == R.K_SPLIT_BAD_OUTPUT:
        # 7.0.0 allocates y as [x[0].size(0), n] for split_item 2/3; CheckCaseSplitK wants a 3-D y.
        raise RuntimeError("When groupType is 2, Dim num or format of tensor in tensor list y is invalid "
                           f"{PARAM_INVALID}.")
    if xt.dtype not in DTYPES or wt.dtype != xt.dtype:
        raise RuntimeError(f"{op}: x {xt.dtype} and weight {wt.dtype} must be the same of float16, bfloat16, "
                           f"float32 {PARAM_INVALID}.")
    if wt.device != xt.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{xt.device} and {wt.device}!")
    _check_dims(op, xt, wt)
    bias = a["bias"]
    if group_type == 0:
        if xt.dim() != 2 or wt.dim() != 3:
            raise RuntimeError(f"{op}: group_type 0 needs x 2-D and weight 3-D, got {xt.dim()}-D and {wt.dim()}-D.")
        if wt.shape[1] != xt.shape[1]:
            raise RuntimeError(f"{op}: K of x ({xt.shape[1]}) and weight ({wt.shape[1]}) differ {PARAM_INVALID}.")
        if not xt.is_contiguous():
            raise RuntimeError(f"{op}: When groupType is 0, x can not be transposed (x must be contiguous).")
        w_transposed = not wt.is_contiguous()
        if w_transposed and not _is_transposed(wt):
            raise RuntimeError(f"{op}: weight must be contiguous or a transposed view, got strides {wt.stride()}.")
        if bias is not None:
            raise NotImplementedError(f"{op}: bias is not modelled (the plugin adds bias itself).")
    else:
        if xt.dim() != 2 or wt.dim() != 2:
            raise RuntimeError(f"{op}: group_type 2 needs x and weight 2-D {PARAM_INVALID}.")
        if xt.shape[1] != wt.shape[0]:
            raise RuntimeError(f"{op}: k dim value of x ({xt.shape[1]}) and weight ({wt.shape[0]}) is not matched.")
        if not _is_transposed(xt) or not wt.is_contiguous():
            raise RuntimeError(f"{op}: When groupType is 2 and x is not separated, tensor in x should be "
                               "transposed (and weight not transposed).")
        if bias is not None:
            raise RuntimeError(f"{op}: When groupType is 2, bias must be empty.")
        w_transposed = False
    x_last = xt.shape[0] if group_type == 2 else xt.shape[1]          # x's innermost dim in memory
    w_last = wt.shape[-2] if w_transposed else wt.shape[-1]
    if x_last >= LAST_DIM_LIMIT or w_last >= LAST_DIM_LIMIT:
        raise RuntimeError(f"{op}: the last dim of x ({x_last}) and of weight ({w_last}) must be below "
                           f"{LAST_DIM_LIMIT}.")
    calls[-1][1]["kernel"] = _gmm_kernel(state, op, xt, wt, group_type)
    num_groups = wt.shape[0] if group_type == 0 else None
    total = xt.shape[0] if group_type == 0 else xt.shape[1]
    ends = _check_group_list(group_list, xt.device, num_groups, total, a["group_list_type"], exact=True, op=op)
    if len(ends) == 1:
        raise KernelContractViolation(f"{op}: a group_list of length 1 is unsupported (MindSpeed: 长度不能为1).")
    start = 0
    if group_type == 0:
        y = torch.full((xt.shape[0], wt.shape[-1]), float("nan"), dtype=xt.dtype)  # at::empty
        for e, end in enumerate(ends):
            if end > start:
                y[start:end] = _mm(xt[start:end], wt[e])
            start = end
    else:
        y = torch.zeros(len(ends), xt.shape[0], wt.shape[1], dtype=xt.dtype)  # empty groups: zeros
        for e, end in enumerate(ends):
            if end > start:
                y[e] = _mm(xt[:, start:end], wt[start:end])
            start = end
    return [y]


def grouped_matmul_list(state: State, a: dict, calls: list):
    calls.append(("npu_grouped_matmul.List", dict(a, release=state.release.name)))
    raise NotImplementedError("npu_grouped_matmul.List (a host int[] group_list, always read as cumsum) is not "
                              "modelled; the plugin must pass a tensor group_list.")


# ---- npu_grouped_matmul_add_ ----------------------------------------------------------------------

def add_kernel(state: State) -> str:
    """Which aclnn kernel op-plugin runs for npu_grouped_matmul_add_ (26.0.0: GroupedMatmulAddNpuOpApi.cpp,
    `has_grouped_matmul_add_v2 && c10_npu::IsAclnnOnly()`; 7.1.0-7.3.0: always aclnnGroupedMatmulAdd)."""
    if state.release.add_v2_on_aclnn_only_soc and "aclnnGroupedMatmulAddV2" in state.cann_kernels \
            and state.soc >= R.ASCEND950:
        return "aclnnGroupedMatmulAddV2"
    return "aclnnGroupedMatmulAdd"


def grouped_matmul_add_(state: State, a: dict, calls: list) -> torch.Tensor:
    op = "npu_grouped_matmul_add_"
    kernel = add_kernel(state)
    calls.append((op, dict(a, release=state.release.name, kernel=kernel)))
    self, x, weight = a["self"], a["x"], a["weight"]
    if a["transpose_x"] is not True or a["transpose_weight"] is not False or a["group_type"] != 2:
        raise RuntimeError(f"{op}: only transpose_x=True, transpose_weight=False, group_type=2 are supported "
                           f"{PARAM_INVALID}.")
    if self.dtype != torch.float32:
        raise RuntimeError(f"{op}: self (yRef) must be float32, got {self.dtype} {PARAM_INVALID}.")
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise RuntimeError(f"{op}: x and weight must both be float16 or both bfloat16, got {x.dtype}, "
                           f"{weight.dtype} {PARAM_INVALID}.")
    if self.dim() not in (2, 3) or x.dim() != 2 or weight.dim() != 2:
        raise RuntimeError(f"{op}: self must be 2-D or 3-D, x 2-D (K, M), weight 2-D (K, N) {PARAM_INVALID}.")
    if not self.is_contiguous():
        raise RuntimeError(f"{op}: self must be contiguous (非连续Tensor不支持) {PARAM_INVALID}.")
    if len({self.device, x.device, weight.device}) != 1:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices!")
    if x.shape[0] != weight.shape[0]:
        raise RuntimeError(f"{op}: x {tuple(x.shape)} and weight {tuple(weight.shape)} differ in K {PARAM_INVALID}.")
    for name, t in (("x", x), ("weight", weight), ("y", self)):  # grouped_matmul_add_def.cpp: every input ND
        if formats.get_npu_format(t) not in _BASE_FORMATS:
            raise RuntimeError(f"{op}: Format of {name} {formats.get_npu_format(t)} is invalid {PARAM_INVALID}.")
    if min(x.numel(), weight.numel()) == 0:
        return self  # aclnnGroupedMatmulAdd: empty x or weight is a success that does nothing
    g = a["group_list"].shape[0] if isinstance(a["group_list"], torch.Tensor) else 0
    if self.numel() != g * x.shape[1] * weight.shape[1]:  # only G*M*N is checked
        raise RuntimeError(f"{op}: self has {self.numel()} elements, not G*M*N = {g}*{x.shape[1]}*{weight.shape[1]} "
                           f"{PARAM_INVALID}.")
    if x.shape[1] >= LAST_DIM_LIMIT or weight.shape[1] >= LAST_DIM_LIMIT:
        raise RuntimeError(f"{op}: the last dims M ({x.shape[1]}) and N ({weight.shape[1]}) must be below "
                           f"{LAST_DIM_LIMIT}.")
    _check_dims(op, x, weight)
    gl_type = a.get("group_list_type", 0)  # absent from the 7.1.0-7.3.0 schema
    gl_type = 0 if gl_type is None else gl_type
    if kernel == "aclnnGroupedMatmulAdd" and gl_type != 0:
        raise KernelContractViolation(
            f"{op}: group_list_type {gl_type} on {state.release.name} with SoC {state.soc}: op-plugin runs "
            "aclnnGroupedMatmulAdd (V1), which reads group_list as cumulative sums whatever group_list_type says.")
    ends = _check_group_list(a["group_list"], x.device, None, x.shape[0], gl_type, exact=False, op=op)
    out = self.view(g, x.shape[1], weight.shape[1])
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[e] += _mm(x[start:end].t(), weight[start:end])
        start = end
    return self


def grouped_matmul_add(state: State, a: dict, calls: list) -> torch.Tensor:
    calls.append(("npu_grouped_matmul_add", dict(a, release=state.release.name)))
    raise NotImplementedError("npu_grouped_matmul_add (out of place, 7.3.0+) is not modelled: the plugin "
                              "accumulates in place.")


IMPLS = {"npu_grouped_matmul": grouped_matmul, "npu_grouped_matmul.List": grouped_matmul_list,
         "npu_grouped_matmul_add_": grouped_matmul_add_, "npu_grouped_matmul_add": grouped_matmul_add,
         "get_npu_format": get_npu_format, "npu_format_cast": npu_format_cast}
