"""The Megatron-core pieces the layer suite times (imported only by it, lazily).

A one-rank gloo world, MoE layers from Megatron's own local spec, the grouped experts given
SequentialMLP's weights (so both route the same tokens through the same experts), Megatron's own
DistributedDataParallel with fp32 grad buffers, and, for megatron-core <= 0.16, the unpatched
legacy GroupedMLP with a per-expert loop standing in for the `grouped_gemm` package (which does
not build without CUDA).
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import types
from unittest import mock

import torch

from .cases import loop_forward


def ensure_world() -> None:
    """A one-process gloo group and Megatron's parallel state (TP=EP=PP=1), unless there is one."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="gmm_bench_gloo_"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def moe_layer(args, experts: int, dtype: torch.dtype, grouped: bool):
    """A MoELayer (router, alltoall dispatcher, SwiGLU experts); grouped: moe_grouped_gemm asked for."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, ffn_hidden_size=args.ffn,
        moe_ffn_hidden_size=args.ffn, num_moe_experts=experts, moe_router_topk=args.topk,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped, use_cpu_initialization=True,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
        gradient_accumulation_fusion=False, moe_aux_loss_coeff=0.0, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0, moe_permute_fusion=False)
    spec = get_moe_module_spec(use_te=False, num_experts=experts, moe_grouped_gemm=grouped)
    return spec(config=config) if isinstance(spec, functools.partial) else build_module(spec, config=config)


@torch.no_grad()
def copy_weights(seq_layer, grouped_layer) -> None:
    """Give grouped_layer SequentialMLP's router and expert weights, exactly.

    Grouped layout: weight1 [H, E*F'] and weight2 [E*F, H] are E contiguous [in, out] blocks;
    SequentialMLP's expert e has linear_fc1.weight [F', H] and linear_fc2.weight [H, F] (out x in).
    """
    grouped_layer.router.weight.copy_(seq_layer.router.weight)
    experts = grouped_layer.experts
    hidden = experts.config.hidden_size
    w1 = experts.weight1.view(experts.num_local_experts, hidden, -1)
    w2 = experts.weight2.view(experts.num_local_experts, -1, hidden)
    for e, mlp in enumerate(seq_layer.experts.local_experts):
        w1[e].copy_(mlp.linear_fc1.weight.t())
        w2[e].copy_(mlp.linear_fc2.weight.t())


def expert_weight_mb(layer) -> float:
    return sum(p.numel() * p.element_size() for p in layer.experts.parameters()) / 2.0 ** 20


def with_ddp(layer):
    """Megatron's own DistributedDataParallel around layer: every parameter gets an fp32
    main_grad in a contiguous grad buffer and DDP's backward hook (what a training run has)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(layer.config, ddp_config, layer)


def release(model) -> None:
    """Let a layer (or DDP around it) that the caller is done with be freed.

    Megatron's token dispatcher keeps the last forward's routing probs; their autograd graph
    reaches the router weight's gradient accumulator, which holds DDP's backward hook, which
    holds DDP and the layer. That cycle runs through C++ autograd nodes, which Python's gc cannot
    traverse, so without this every DDP block's layers, grad buffers included, stayed alive to the
    end of the run (docs/benchmarks.md, peak memory). Dropping every tensor that a module (or an
    object it holds, like the dispatcher) keeps with an autograd graph breaks it."""
    for module in model.modules():
        held = [v for v in vars(module).values() if hasattr(v, "__dict__") and not isinstance(v, torch.nn.Module)]
        for obj in (module, *held):
            for name, value in list(vars(obj).items()):
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    setattr(obj, name, None)


def has_legacy_grouped_mlp() -> bool:
    import patches
    return patches.version_rules().legacy_grouped_mlp


def _loop_gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm's signature over a per-expert torch.mm loop."""
    return loop_forward(a, b.transpose(-1, -2) if trans_b else b, batch_sizes.tolist())


@contextlib.contextmanager
def unpatched_legacy(cfg):
    """Megatron's own legacy GroupedMLP code, with _loop_gmm as its grouped GEMM; the plugin's
    patches are off inside (they replace that class's forward) and back on with cfg after."""
    import patches
    from megatron.core.transformer.moe import grouped_gemm_util as gg
    patches.revert()
    try:
        with mock.patch.object(gg, "ops", types.SimpleNamespace(gmm=_loop_gmm)), \
                mock.patch.object(gg, "grouped_gemm", gg.grouped_gemm or object()):
            yield
    finally:
        patches.apply(cfg)
