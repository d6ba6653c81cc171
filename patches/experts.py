"""Megatron-core grouped-MLP experts on gmm-plugin's npu_gmm_v2.

Both expert GEMMs take the dispatcher's tokens_per_expert (per-expert counts) as npu_gmm_v2's
group_list exactly as they are: no cumsum, no .cpu()/.tolist(), no copy (host counts for device
tokens are the op's host data: gmm_plugin.group_list.Groups); only integer counts other than
int64 are widened, on their own device. The weights keep the legacy GroupedMLP layout (weight1
[H, E*F'], weight2 [E*F, H], seen as [E, H, F'] and [E, F, H]), so `main_grad` of the whole
parameter is where gemm_fusion accumulates.

- megatron-core 0.12-0.16: the legacy `GroupedMLP` keeps its class, constructor and checkpoint
  format; its forward is replaced and `grouped_gemm_util` reports the plugin as the grouped GEMM.
- megatron-core 0.17-0.19: `GmmGroupedMLP` below; with `moe_grouped_gemm=True`, a MoELayer whose
  spec asks for SequentialMLP (what the local spec always returns there) builds it instead.
"""
from __future__ import annotations

import types

import torch

from gmm_plugin.ops import gmm as gmm_ops

from . import expert_checkpoint


_NARROW_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32)


def _counts(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Megatron's counts as npu_gmm_v2's int64 group_list: int64 (every dispatcher) as they are;
    narrower integers (int32 on some paths) widened on their own device, never a sync. Anything
    else goes to the op as it is, whose TypeError names group_list."""
    if isinstance(tokens_per_expert, torch.Tensor) and tokens_per_expert.dtype in _NARROW_INTS:
        return tokens_per_expert.to(torch.int64)
    return tokens_per_expert


def _plugin_config(module):
    """GmmGroupedMLP's own config (taken when built); the legacy GroupedMLP follows apply()'s."""
    cfg = getattr(module, "plugin_config", None)
    if cfg is None:
        from . import active_config
        cfg = active_config()
    return cfg


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor,
                   original_weight: torch.Tensor | None = None, cfg=None) -> torch.Tensor:
    """x [M, K] times weight [E, K, N] per expert group, with cfg (default: patches.active_config())."""
    if cfg is None:
        from . import active_config
        cfg = active_config()
    counts = _counts(tokens_per_expert)
    kwargs = {}
    if cfg.gemm_fusion and original_weight is not None and getattr(original_weight, "main_grad", None) is not None:
        kwargs = {"gemm_fusion": True, "original_weight": original_weight}
    if cfg.group_list_form == "cumsum":  # MindSpeed's v1 call, for parity checks only
        return gmm_ops.npu_gmm(x, weight, group_list=torch.cumsum(counts, 0), **kwargs)
    return gmm_ops.npu_gmm_v2(x, weight, group_list=counts, **kwargs)


def experts_forward(module, x, tokens_per_expert, probs, activation):
    """The grouped MLP: fc1 -> activation (times probs) -> fc2, on module.weight1/weight2.

    activation(h, probs_column_or_None). Returns (output, None) like every Megatron experts class.
    Zero tokens go through the same GEMMs (M = 0), so every expert weight still gets a gradient
    (zero), as DDP's hooks expect, and gemm_fusion stays consistent within an iteration.
    """
    config = module.config
    if probs is not None and getattr(config, "moe_apply_probs_on_input", False):
        if config.moe_router_topk != 1:
            raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1.")
        x = (probs.unsqueeze(-1) * x).to(x.dtype)
        probs = torch.ones_like(probs)
    cfg = _plugin_config(module)
    num_experts, hidden = module.num_local_experts, config.hidden_size
    w1 = module.weight1.view(num_experts, hidden, -1)
    w2 = module.weight2.view(num_experts, -1, hidden)
    fc1 = grouped_linear(x, w1, tokens_per_expert, module.weight1, cfg)
    probs_col = None if probs is None else probs.unsqueeze(-1)
    if getattr(module, "activation_recompute", False):
        module.activation_checkpoint = _checkpoint_without_output(config)
        args = (fc1,) if probs_col is None else (fc1, probs_col)
        h = module.activation_checkpoint.checkpoint(activation, *args)
        out = grouped_linear(h, w2, tokens_per_expert, module.weight2, cfg)
        module.activation_checkpoint.discard_output_and_register_recompute(out)
    else:
        out = grouped_linear(activation(fc1, probs_col), w2, tokens_per_expert, module.weight2, cfg)
    return out, None


def _checkpoint_without_output(config):
    import inspect

    from megatron.core.tensor_parallel import CheckpointWithoutOutput
    if "fp8" in inspect.signature(CheckpointWithoutOutput.__init__).parameters:
        # 0.16+ stores `fp8 is not None`, so its default (False) means "fp8" and needs TE:
        # pass the config's value (None unless fp8 training), which Megatron's own callers omit.
        return CheckpointWithoutOutput(fp8=getattr(config, "fp8", None))
    return CheckpointWithoutOutput()


# ----------------------------------------------------------------------------------------------
# megatron-core 0.12 - 0.16: the legacy GroupedMLP


def legacy_grouped_mlp_forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs=None):
    """GroupedMLP.forward on the plugin; permuted_probs exists from 0.12.1 (None before)."""

    def activation(h, probs=None):
        if probs is None:
            return self.activation_func(h)
        return self.activation_func_with_probs(h, probs)

    if (permuted_local_hidden_states.shape[0] == 0 and isinstance(tokens_per_expert, torch.Tensor)
            and tokens_per_expert.is_floating_point()):
        # With no tokens, GroupedMLP never hands its counts to grouped_gemm: it only asserts they
        # are all zero, whatever their dtype (Megatron's test_gradient_with_no_tokens_allocated
        # passes float zeros). Only real dispatchers' integer counts reach the GEMMs otherwise.
        if torch.count_nonzero(tokens_per_expert).item() != 0:
            raise ValueError("tokens_per_expert must be all zero when no tokens are given, got "
                             f"{tokens_per_expert.tolist()}.")
        tokens_per_expert = torch.zeros_like(tokens_per_expert, dtype=torch.int64)
    return experts_forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, activation)


def legacy_gmm(a, b, batch_sizes, trans_b=False, gemm_fusion=False, original_weight=None):
    """`grouped_gemm.ops.gmm(a, b, batch_sizes, trans_b=False)` for code that still calls
    grouped_gemm_util.ops.gmm (MindSpeed's extra arguments accepted).

    The contract of the fork Megatron 0.12-0.16 installs (fanshiqing/grouped_gemm, ops.py and
    csrc/grouped_gemm.cu): its first check refuses all-zero batch_sizes with "Input batch_sizes
    should not be all zeros!", before any dtype or shape is looked at (Megatron's own
    test_gpu_forward_with_no_tokens_allocated expects that message); then batch_sizes are 1-D
    int64 per-expert counts, a [M, K], b [E, K, N] ([E, N, K] with trans_b). The fork takes host
    batch_sizes only; device ones are accepted too (the all-zero check is then skipped: it would
    be a host read), and integer counts other than int64 are widened like the experts' counts.
    """
    if not isinstance(batch_sizes, torch.Tensor):
        raise TypeError(f"batch_sizes must be a 1-D torch.Tensor of per-expert counts, got {type(batch_sizes).__name__}.")
    if batch_sizes.device.type == "cpu" and not bool(batch_sizes.any()):
        raise ValueError("Input batch_sizes should not be all zeros!")
    if batch_sizes.dtype not in (torch.int64, *_NARROW_INTS):
        raise TypeError(f"batch_sizes must be int64 per-expert counts, got dtype {batch_sizes.dtype}.")
    if not isinstance(trans_b, bool):
        raise TypeError(f"trans_b must be a bool, got {type(trans_b).__name__}.")
    if trans_b and isinstance(b, torch.Tensor):
        b = b.transpose(-1, -2)
    return gmm_ops.npu_gmm_v2(a, b, group_list=_counts(batch_sizes), gemm_fusion=gemm_fusion,
                              original_weight=original_weight)


legacy_ops = types.SimpleNamespace(gmm=legacy_gmm)


def grouped_gemm_is_available() -> bool:
    return True


def assert_grouped_gemm_is_available() -> None:
    return None


# ----------------------------------------------------------------------------------------------
# megatron-core 0.17 - 0.19: no legacy class any more; our own grouped experts


def _unsupported_options(config) -> list[str]:
    bad = []
    if config.add_bias_linear:
        bad.append("add_bias_linear=True (set --disable-bias-linear)")
    if getattr(config, "moe_latent_size", None) is not None:
        bad.append("moe_latent_size")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        bad.append("fp8/fp4")
    if getattr(config, "moe_mlp_glu_interleave_size", None) is not None:
        bad.append("moe_mlp_glu_interleave_size")
    if getattr(config, "use_te_activation_func", False):
        bad.append("use_te_activation_func")
    return bad


def make_grouped_mlp_class():
    """Build GmmGroupedMLP against the installed megatron-core (imported lazily)."""
    import torch.nn.functional as F
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
    from megatron.core.tensor_parallel.layers import (_initialize_affine_weight_cpu, _initialize_affine_weight_gpu,
                                                      set_tensor_model_parallel_attributes)
    from megatron.core.tensor_parallel.utils import divide
    from megatron.core.transformer.module import MegatronModule

    class GmmGroupedMLP(MegatronModule):
        """Grouped-GEMM experts on gmm-plugin (megatron-core 0.17+ without Transformer Engine).

        Same parameters and layout as the legacy GroupedMLP (weight1 [H, E*F'], weight2
        [E*F, H]) and the same forward as the patched legacy class. Checkpoints (state_dict and
        sharded_state_dict) are SequentialMLP's; a legacy weight1/weight2 state_dict loads too.
        Implements Megatron's ExpertsInterface: forward(x, tokens_per_expert, permuted_probs) ->
        (out, None) and backward_dw().
        """

        def __init__(self, num_local_experts, config, submodules=None, pg_collection=None, name=None):
            from . import active_config, version_rules
            super().__init__(config=config)
            self.plugin_config = active_config()  # its settings from now on, apply()'d or not
            rules = version_rules()
            bad = _unsupported_options(config)
            if bad:
                raise ValueError("gmm-plugin grouped experts do not support: " + ", ".join(bad) +
                                 ". Disable the plugin (--use-gmm-plugin off / enabled: false) to get "
                                 "Megatron's SequentialMLP.")
            self.num_local_experts = num_local_experts
            if pg_collection is None:
                from megatron.core.process_groups_config import ProcessGroupCollection
                pg_collection = ProcessGroupCollection.use_mpu_process_groups()
            self.ep_group, self.tp_group = pg_collection.ep, pg_collection.expt_tp
            self.dp_group = getattr(pg_collection, "expt_dp", None)
            self.expert_parallel = config.expert_model_parallel_size > 1
            self.activation_recompute = (config.recompute_granularity == "selective"
                                         and "moe_act" in config.recompute_modules)
            tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
            ffn = config.moe_ffn_hidden_size * num_local_experts
            fc1_out = ffn * (2 if config.gated_linear_unit else 1)
            fc1_part, fc2_part = divide(fc1_out, tp_size), divide(ffn, tp_size)
            hidden, dtype = config.hidden_size, config.params_dtype
            device = None if config.use_cpu_initialization else torch.cuda.current_device()
            self.weight1 = torch.nn.Parameter(torch.empty(hidden, fc1_part, device=device, dtype=dtype))
            self.weight2 = torch.nn.Parameter(torch.empty(fc2_part, hidden, device=device, dtype=dtype))
            # Initialised as the legacy GroupedMLP was (whole stacked weights, partition_dim 1 /
            # 0, stride 1), which sets the TP attributes. Without initialisation Megatron's expert
            # linears set them too from 0.18 (not on 0.17, nor this class there): the grad norm
            # counts a tensor_model_parallel weight on every TP rank, any other on TP rank 0 only.
            if config.perform_initialization:
                if config.use_cpu_initialization:
                    _initialize_affine_weight_cpu(self.weight1, hidden, fc1_out, fc1_part, partition_dim=1,
                                                  init_method=config.init_method, params_dtype=dtype,
                                                  rank=tp_rank, world_size=tp_size)
                    _initialize_affine_weight_cpu(self.weight2, ffn, hidden, fc2_part, partition_dim=0,
                                                  init_method=config.output_layer_init_method,
                                                  params_dtype=dtype, rank=tp_rank, world_size=tp_size)
                else:
                    _initialize_affine_weight_gpu(self.weight1, config.init_method, partition_dim=1,
                                                  is_expert=True)
                    _initialize_affine_weight_gpu(self.weight2, config.output_layer_init_method,
                                                  partition_dim=0, is_expert=True)
            elif rules.tp_attributes_always:
                set_tensor_model_parallel_attributes(self.weight1, is_parallel=True, dim=1, stride=1)
                set_tensor_model_parallel_attributes(self.weight2, is_parallel=True, dim=0, stride=1)
            # DDP puts parameters without allreduce into the expert-parallel buffers (expert DP).
            for w in (self.weight1, self.weight2):
                setattr(w, "allreduce", rules.expert_allreduce(config))

        def _activation(self, h, probs=None):
            config = self.config
            if config.bias_activation_fusion and config.gated_linear_unit \
                    and config.activation_func is F.silu and probs is not None:
                # Megatron's own experts (TEGroupedMLP, SequentialMLP) fuse SwiGLU with the
                # probs here: one kernel on a GPU, and their rounding.
                return weighted_bias_swiglu_impl(h, None, probs,
                                                 getattr(config, "activation_func_fp8_input_store", False))
            dtype = h.dtype
            if config.gated_linear_unit:
                gate, up = torch.chunk(h, 2, dim=-1)
                clamp = getattr(config, "activation_func_clamp_value", None)
                if clamp is not None:
                    gate, up = gate.clamp(max=clamp), up.clamp(min=-clamp, max=clamp)
                h = config.activation_func(gate) * (up + getattr(config, "glu_linear_offset", 0.0))
            else:
                h = config.activation_func(h)
            return h if probs is None else (h * probs).to(dtype)

        def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs=None):
            return experts_forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs,
                                   self._activation)

        def backward_dw(self):
            """No deferred weight-gradient work: dW is computed (or fused) in backward."""

        # Checkpoints: SequentialMLP's layout, in patches/expert_checkpoint.py.
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            expert_checkpoint.save_to_state_dict(self, destination, prefix, keep_vars)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            expert_checkpoint.load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                                   missing_keys, unexpected_keys, error_msgs)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return expert_checkpoint.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    return GmmGroupedMLP


def is_sequential_mlp_builder(builder, sequential_cls) -> bool:
    """True for SequentialMLP itself or functools.partial(SequentialMLP, ...) (the local spec)."""
    func = getattr(builder, "func", builder)
    return func is sequential_cls


def wrap_moe_layer_init(original_init, grouped_cls, sequential_cls, active=lambda: True, always=lambda: False,
                        on_built=None):
    """MoELayer.__init__ that builds grouped_cls where moe_grouped_gemm asks for grouped experts
    (or always() says so: grouped_experts, for MindSpeed core_r0.18.0 which rejects
    --moe-grouped-gemm) but the spec gave SequentialMLP. The spec object itself is never modified.
    Installed by apply() only while the plugin is enabled; inert once active() is False (revert()
    could not take it out because someone wrapped over it). on_built(experts) after the build."""
    import dataclasses
    import functools
    import inspect

    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        if not active():
            return original_init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        config, submodules = bound.arguments.get("config"), bound.arguments.get("submodules")
        if (config is not None and (getattr(config, "moe_grouped_gemm", False) or always())
                and submodules is not None
                and is_sequential_mlp_builder(getattr(submodules, "experts", None), sequential_cls)):
            bound.arguments["submodules"] = dataclasses.replace(submodules, experts=grouped_cls)
        result = original_init(*bound.args, **bound.kwargs)
        if on_built is not None and hasattr(self, "experts"):
            on_built(self.experts)
        return result

    return __init__
