"""The MoE GPT of the pretraining example and its implementation-independent initialization.

Every parameter is initialized from (seed, parameter name), experts from (seed, layer, global
expert index), independently of the experts implementation and of the expert-parallel size. So a
run with the plugin, one without it and a 2-process expert-parallel run start from identical
weights and their loss curves can be compared step by step.
"""
from __future__ import annotations

import hashlib
import math

import torch

import moe_data

VOCAB_MULTIPLE = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def megatron_grouped_gemm_usable(device: str) -> bool:
    """Can Megatron's *own* grouped-GEMM experts run here (without the plugin)?"""
    try:  # megatron-core <= 0.16: the legacy GroupedMLP needs the CUDA grouped_gemm package
        from megatron.core.transformer.moe import grouped_gemm_util as gg
        return device == "cuda" and gg.grouped_gemm_is_available()
    except ImportError:  # >= 0.17: only TEGroupedMLP, which this local-spec example does not build
        return False


def build_model(cfg: dict, device: str, use_plugin: bool, log):
    """(GPTModel with MoE layers on device, its TransformerConfig)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, t = cfg["model"], cfg["train"]
    dtype = DTYPES[m["dtype"]]
    grouped = m["moe_grouped_gemm"]
    if grouped and not use_plugin and not megatron_grouped_gemm_usable(device):
        log("note: Megatron's own grouped-GEMM experts need the CUDA grouped_gemm package (or Transformer "
            "Engine); without --use-gmm-plugin this run uses Megatron's SequentialMLP experts")
        grouped = False
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        ffn_hidden_size=m["moe_ffn_hidden_size"], num_moe_experts=m["num_experts"],
        moe_router_topk=m["moe_router_topk"], moe_ffn_hidden_size=m["moe_ffn_hidden_size"],
        moe_grouped_gemm=grouped, moe_token_dispatcher_type=m["moe_token_dispatcher_type"],
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=m["moe_aux_loss_coeff"],
        expert_model_parallel_size=t["expert_parallel_size"],
        gated_linear_unit=m["swiglu"], activation_func=F.silu if m["swiglu"] else F.gelu,
        add_bias_linear=False, init_method_std=m["init_method_std"],
        hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=m["dtype"] == "bf16", fp16=m["dtype"] == "fp16",
        use_cpu_initialization=True,  # then canonical_init() and a move to the device
        # Fused kernels are CUDA-only extensions; the plain PyTorch paths run everywhere.
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        moe_permute_fusion=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=m["num_experts"], moe_grouped_gemm=grouped)
    vocab = -(-moe_data.VOCAB_SIZE // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                     max_sequence_length=m["seq_length"], position_embedding_type="rope",
                     share_embeddings_and_output_weights=True)
    canonical_init(model, cfg)
    if device != "cpu":
        model.to(device)
    return model, config


def _draw(seed: int, key: str, shape, std: float) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _expert_layouts(experts):
    """(local index, fc1 setter, fc2 setter) per local expert, for the experts classes we know.

    A setter takes the weight in Linear layout ([out, in]) and writes it in the class's layout.
    """
    def copy_to(dst):
        return lambda w: dst.copy_(w.to(dst.dtype))

    def copy_transposed(dst):  # dst is an [in, out] block
        return lambda w: dst.copy_(w.t().to(dst.dtype))

    if hasattr(experts, "local_experts"):  # SequentialMLP: one MLP per expert
        return [(i, copy_to(e.linear_fc1.weight), copy_to(e.linear_fc2.weight))
                for i, e in enumerate(experts.local_experts)]
    if hasattr(experts, "weight1") and hasattr(experts, "weight2"):  # legacy GroupedMLP: E [in, out] blocks
        n = experts.num_local_experts
        w1 = experts.weight1.view(n, experts.config.hidden_size, -1)
        w2 = experts.weight2.view(n, -1, experts.config.hidden_size)
        return [(i, copy_transposed(w1[i]), copy_transposed(w2[i])) for i in range(n)]
    fc1, fc2 = getattr(experts, "linear_fc1", None), getattr(experts, "linear_fc2", None)
    if fc1 is not None and hasattr(fc1, "weight0"):  # TE-style grouped linear: weight{i} [out, in]
        n = experts.num_local_experts
        return [(i, copy_to(getattr(fc1, f"weight{i}")), copy_to(getattr(fc2, f"weight{i}"))) for i in range(n)]
    return None


@torch.no_grad()
def canonical_init(model, cfg: dict) -> None:
    """Initialize every parameter from (seed, name), experts from (seed, layer, global expert).

    Same distributions as Megatron's defaults (normal(0, std); output projections std/sqrt(2L);
    norms ones, biases zeros, left as built), but independent of the experts class and of the
    expert-parallel size, so runs with and without the plugin, or with EP 1 and 2, are comparable.
    """
    from megatron.core import parallel_state

    m, seed = cfg["model"], cfg["train"]["seed"]
    std = m["init_method_std"]
    out_std = std / math.sqrt(2.0 * m["num_layers"])
    n_local = m["num_experts"] // cfg["train"]["expert_parallel_size"]
    first = parallel_state.get_expert_model_parallel_rank() * n_local
    for name, p in model.named_parameters():
        if ".mlp.experts." in name or "norm" in name or name.endswith("bias"):
            continue
        scaled = "linear_proj" in name or "linear_fc2" in name
        p.copy_(_draw(seed, name, p.shape, out_std if scaled else std).to(p.dtype))
    for layer in model.decoder.layers:
        experts = layer.mlp.experts
        layouts = _expert_layouts(experts)
        if layouts is None:
            raise RuntimeError(f"canonical_init: unknown experts class {type(experts).__name__}")
        h, f = m["hidden_size"], m["moe_ffn_hidden_size"]
        for i, set_fc1, set_fc2 in layouts:
            key = f"layer{layer.layer_number}/expert{first + i}"
            set_fc1(_draw(seed, key + "/fc1", (2 * f if m["swiglu"] else f, h), std))
            set_fc2(_draw(seed, key + "/fc2", (h, f), out_std))


def experts_description(model) -> str:
    experts = model.decoder.layers[0].mlp.experts
    cls = type(experts)
    return f"{cls.__module__}.{cls.__qualname__}"


def routers(model) -> list:
    """Each MoE layer's router (its forward returns (probs, routing_map) in every megatron-core
    this example supports)."""
    return [layer.mlp.router for layer in model.decoder.layers]
