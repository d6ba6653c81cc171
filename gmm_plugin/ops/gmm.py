"""npu_gmm and npu_gmm_v2: MindSpeed's grouped-matmul interface (mindspeed.ops.gmm).

    y = npu_gmm(x, weight, *, bias=None, group_list=None, group_type=0,
                gemm_fusion=False, original_weight=None)

npu_gmm takes group_list as cumulative sums, npu_gmm_v2 as per-group sizes; otherwise they are
the same call. group_type 0 splits M (x [M, K], weight [E, K, N] -> y [M, N]), group_type 2
splits K (x [K', M], weight [M, N] -> y [E, K', N]), group_type -1 is a plain matmul.
"""
from __future__ import annotations

from .. import checks, settings
from ..backends import select_backend
from ..function import Call, GroupedMatmulFunction
from ..group_list import make_groups

__all__ = ["npu_gmm", "npu_gmm_v2"]


def npu_gmm(x, weight, *, bias=None, group_list=None, group_type=0, gemm_fusion=False, original_weight=None):
    """Grouped matmul with group_list as cumulative sums (non-decreasing, last == grouped size)."""
    return _grouped_matmul(x, weight, bias, group_list, group_type, gemm_fusion, original_weight, cumsum=True)


def npu_gmm_v2(x, weight, *, bias=None, group_list=None, group_type=0, gemm_fusion=False, original_weight=None):
    """Grouped matmul with group_list as per-group sizes (non-negative, sum == grouped size)."""
    return _grouped_matmul(x, weight, bias, group_list, group_type, gemm_fusion, original_weight, cumsum=False)


def _grouped_matmul(x, weight, bias, group_list, group_type, gemm_fusion, original_weight, *, cumsum):
    checks.check_tensor(x, "x")
    checks.check_tensor(weight, "weight")
    checks.check_tensor(bias, "bias", allow_none=True)
    group_type = checks.check_group_type(group_type)
    checks.check_dtypes(x, weight, bias)
    checks.check_fusion_args(gemm_fusion, original_weight)
    checks.check_group_list_type(group_list, cumsum=cumsum, group_type=group_type)
    checks.check_devices(x, weight=weight, bias=bias, group_list=group_list, original_weight=original_weight)
    num_groups = None if group_list is None else len(group_list)
    checks.check_shapes(x, weight, bias, group_type, num_groups)
    if gemm_fusion:
        if group_type != 0:
            raise ValueError(f"gemm_fusion is supported for group_type 0 only, got group_type {group_type}.")
        from ..fusion import main_grad_view
        main_grad_view(original_weight, weight)  # fail now, not in backward
    now = settings.current()  # captured: the backward of this call uses the same
    groups = None
    if group_type != -1:
        total, axis = (x.shape[0], "x.shape[0] (M)") if group_type == 0 else (x.shape[1], "x.shape[1] (the split K axis)")
        groups = make_groups(group_list, cumsum=cumsum, total=total, device=x.device, axis=axis,
                             check_device=now.check_group_list)
    call = Call(group_type, groups, select_backend(x.device, now.backend), gemm_fusion,
                now.wgrad_dtype_on(x.device))
    return GroupedMatmulFunction.apply(x, weight, bias, original_weight, call)
