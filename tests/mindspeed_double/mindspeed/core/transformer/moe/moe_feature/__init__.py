"""`mindspeed/core/transformer/moe/moe_feature/__init__.py`: line 9 (26.0.0_core_r0.12.1)
`from megatron.core.transformer.moe import grouped_gemm_util`: the MODULE, so GmmExpertsImpl's
`gg.ops.gmm` is looked up on Megatron's module at every call. core_r0.17.0 line 52:
`from megatron.core.transformer.moe.experts import TEGroupedMLP as GroupedMLP`, and :63 MindSpeed's
own grouped_gemm_util (Megatron 0.17 has none)."""
from mindspeed import branch

if branch() == "26.0.0_core_r0.12.1":
    from megatron.core.transformer.moe import grouped_gemm_util  # noqa: F401
    from megatron.core.transformer.moe.experts import GroupedMLP  # noqa: F401
else:
    from megatron.core.transformer.moe.experts import TEGroupedMLP as GroupedMLP  # noqa: F401

    from mindspeed.core.transformer.moe import grouped_gemm_util  # noqa: F401
