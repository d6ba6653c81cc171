"""`GmmExpertsImpl` of `mindspeed/core/transformer/moe/moe_feature/gmm/experts.py`
(26.0.0_core_r0.12.1), its non-quantised, non-recompute path:

- __init__ (:21-38; core_r0.16.0 :18-32 adds pg_collection, passed on to Megatron's): sets the attributes, then Megatron's GroupedMLP.__init__ builds weight1
  [H, E*F'] / weight2 [E*F, H]; with GLU the activation is fused_swiglu (silu only, :36-38).
- forward (:40-121): gemm_fusion = config.gemm_gradient_accumulation_fusion (:55, the attribute
  MindSpeed's TransformerConfig wrapper adds); with tokens: w1 = weight1.view(E, H, -1),
  w2 = weight2.view(E, -1, H) (:64-65), then `gg.ops.gmm(x, w1, tokens_per_expert, trans_b=False,
  gemm_fusion=gemm_fusion, original_weight=self.weight1)` (:73-76), looked up on Megatron's
  grouped_gemm_util at call time; activation_func_with_probs(fc1, probs.unsqueeze(-1)) (:78);
  the same gmm for w2 (:91-92). Without tokens: assert all counts zero and plain matmuls on the
  weights seen 2-D (:93-109), so every weight still gets a (zero) gradient. Returns (out, None).
  tokens_per_expert go as the dispatcher gives them (host or device; MindSpeed's alltoall preprocess
  keeps them on the device, moe_feature/common.py ascend_gmm_preprocess).
"""
import torch
import torch.nn.functional as F

from mindspeed.core.transformer.moe.moe_feature import grouped_gemm_util as gg


def fused_swiglu(x):
    """mindspeed.core.fusions.fused_bias_swiglu.fused_swiglu: silu(first half) * second half."""
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


class GmmExpertsImpl:
    def __init__(self, num_local_experts, config=None, pg_collection=None):
        self.num_local_experts = num_local_experts
        self.config = config
        self.layer_number = None
        self.weight1 = None
        self.weight2 = None
        extra = () if pg_collection is None else (pg_collection,)
        super().__init__(num_local_experts, config, *extra)
        if self.config.gated_linear_unit:
            assert self.config.activation_func == F.silu, "Activation function must be silu when using fused_swiglu."
            self.activation_func = fused_swiglu

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs=None):
        gemm_fusion = getattr(self.config, "gemm_gradient_accumulation_fusion", False)
        hidden = self.config.hidden_size
        if permuted_local_hidden_states.nelement() != 0:
            w1 = self.weight1.view(self.num_local_experts, hidden, -1)
            w2 = self.weight2.view(self.num_local_experts, -1, hidden)
            fc1 = gg.ops.gmm(permuted_local_hidden_states, w1, tokens_per_expert, trans_b=False,
                             gemm_fusion=gemm_fusion, original_weight=self.weight1)
            inter = self.activation_func_with_probs(fc1, permuted_probs.unsqueeze(-1))
            out = gg.ops.gmm(inter, w2, tokens_per_expert, trans_b=False, gemm_fusion=gemm_fusion,
                             original_weight=self.weight2)
        else:
            assert torch.count_nonzero(tokens_per_expert) == 0
            h = torch.matmul(permuted_local_hidden_states, self.weight1.view(hidden, -1))
            inter = self.activation_func_with_probs(h, permuted_probs.unsqueeze(-1))
            out = torch.matmul(inter, self.weight2.view(-1, hidden))
        return out, None
