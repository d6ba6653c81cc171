"""`mindspeed/core/fusions/grouped_matmul.py` (26.0.0_core_r0.12.1): `Ops.gmm(a, b, batch_sizes,
trans_b=False, gemm_fusion=False, original_weight=None)` (:8) does `b.t()` for trans_b (:10-11),
`torch.cumsum(batch_sizes, dim=0).to('npu')` (:12: a cumsum and a host-to-device copy on every
call) and npu_gmm(group_type=0) with that cumsum (:13-21). Installed as the CLASS itself
(grouped_gemm_util.ops = Ops). On a CPU the double keeps the cumsum and the copy (to the tokens'
device), computes npu_gmm's result from the cumsum with per-group matmuls (autograd gives dx/dW;
the fused main_grad accumulation of MindSpeed's GMM+ADD is not modelled) and records every call in
CALLS, so a test sees that MindSpeed's GMM ran and with which gemm_fusion."""
import torch

CALLS = []


class Ops:
    @staticmethod
    def gmm(a, b, batch_sizes, trans_b=False, gemm_fusion=False, original_weight=None):
        if trans_b:
            b = b.t()
        group_list = torch.cumsum(batch_sizes, dim=0).to(a.device)
        CALLS.append({"gemm_fusion": gemm_fusion, "original_weight": original_weight is not None})
        ends = group_list.tolist()
        starts = [0] + ends[:-1]
        return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, ends))], dim=0)


def grouped_gemm_is_available():
    return True


def assert_grouped_gemm_is_available():
    return None
