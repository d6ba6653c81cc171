"""MindSpeed-LLM double (Ascend/MindSpeed-LLM 26.0.0). `pretrain_gpt.py:10` imports mindspeed_llm,
which applies MindSpeed's features at import (`mindspeed_llm/tasks/megatron_adaptor_v2.py:80-87,112`)
and adds its own patches, among them `zero_experts_moe_layer_init_wrapper`
(`mindspeed_llm/core/transformer/moe/zero_experts_moe_layer.py:21-22`): a functools.wraps wrapper of
MoELayer.__init__, registered through MindSpeed's patch manager (a `*_wrapper` name: stacked as a
decorator, patch_utils.py:71). It reports Megatron's __module__ / __qualname__; only its code lives
in mindspeed_llm."""
import mindspeed.megatron_adaptor  # noqa: F401  (MindSpeed's features, from sys.argv)
from mindspeed.patch_utils import MindSpeedPatchesManager
from mindspeed_llm.zero_experts_moe_layer import zero_experts_moe_layer_init_wrapper

MindSpeedPatchesManager.register_patch("megatron.core.transformer.moe.moe_layer.MoELayer.__init__",
                                       zero_experts_moe_layer_init_wrapper)
MindSpeedPatchesManager.apply_patches()
