"""Shared helpers for the Megatron tests: a world-size-1 gloo group, version-tolerant builders of
the experts / MoE layers, and the weight conversion between SequentialMLP and the grouped layout.

The grouped layout (legacy GroupedMLP and GmmGroupedMLP): weight1 [H, E*F'] is E contiguous
[H, F'] blocks (in x out), weight2 [E*F, H] is E contiguous [F, H] blocks. SequentialMLP's expert e
has linear_fc1.weight [F', H] and linear_fc2.weight [H, F] (out x in), so block e = weight.T.
"""
from __future__ import annotations

import functools
import inspect
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

import patches


def version():
    return patches.megatron_version()


def ensure_world():
    """One-process gloo group and Megatron's default parallel state (TP=EP=PP=1)."""
    from megatron.core import parallel_state
    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(prefix="gmm_gloo_"), "store")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def make_config(*, experts, topk=2, glu=True, dtype=torch.float32, hidden=16, ffn=12, dispatcher="alltoall",
                **extra):
    from megatron.core.transformer import TransformerConfig
    kw = dict(num_layers=1, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=ffn,
              moe_ffn_hidden_size=ffn, num_moe_experts=experts, moe_router_topk=topk,
              moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=True, use_cpu_initialization=True,
              add_bias_linear=False, gated_linear_unit=glu, activation_func=F.silu if glu else F.gelu,
              bias_activation_fusion=False, gradient_accumulation_fusion=False, moe_aux_loss_coeff=0.0,
              params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
              hidden_dropout=0.0, attention_dropout=0.0, moe_permute_fusion=False)
    kw.update(extra)
    if kw["moe_router_topk"] == 1:
        kw.setdefault("moe_router_pre_softmax", True)  # Megatron requires it for top-1 softmax
    return TransformerConfig(**kw)


def _pg_kwargs(cls):
    params = inspect.signature(cls.__init__).parameters
    if "pg_collection" in params:
        from megatron.core.process_groups_config import ProcessGroupCollection
        return {"pg_collection": ProcessGroupCollection.use_mpu_process_groups()}
    return {}


def grouped_experts_class():
    if patches.version_rules().legacy_grouped_mlp:
        from megatron.core.transformer.moe.experts import GroupedMLP
        return GroupedMLP
    return patches.grouped_mlp_class()


def build_grouped(num_local_experts, config):
    cls = grouped_experts_class()
    return cls(num_local_experts, config, **_pg_kwargs(cls))


def build_sequential(num_local_experts, config):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return SequentialMLP(num_local_experts, config, subs, **_pg_kwargs(SequentialMLP))


def moe_layer(config, grouped: bool):
    """A MoELayer from Megatron's own local spec (grouped: moe_grouped_gemm asked for)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=grouped)
    if not grouped:
        import dataclasses
        config = dataclasses.replace(config, moe_grouped_gemm=False)
    if isinstance(spec, functools.partial):  # 0.17+: specs are builders
        return spec(config=config)
    return build_module(spec, config=config)


def copy_sequential_to_grouped(seq, grouped):
    """Give grouped the weights of seq (exactly; no arithmetic)."""
    num, hidden = grouped.num_local_experts, grouped.config.hidden_size
    with torch.no_grad():
        w1 = grouped.weight1.view(num, hidden, -1)
        w2 = grouped.weight2.view(num, -1, hidden)
        for e, expert in enumerate(seq.local_experts):
            w1[e].copy_(expert.linear_fc1.weight.t())
            w2[e].copy_(expert.linear_fc2.weight.t())


def sequential_grads_as_grouped(seq, num, hidden):
    """SequentialMLP's weight grads laid out like weight1/weight2 (for comparison)."""
    g1 = torch.stack([e.linear_fc1.weight.grad.t() for e in seq.local_experts])  # [E, H, F']
    g2 = torch.stack([e.linear_fc2.weight.grad.t() for e in seq.local_experts])  # [E, F, H]
    return g1, g2


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
